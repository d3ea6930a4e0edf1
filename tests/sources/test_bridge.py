"""AsyncioBridge: calls run on asyncio, in asyncio's world, from either backend."""

from __future__ import annotations

import asyncio

import anyio
import sniffio

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
