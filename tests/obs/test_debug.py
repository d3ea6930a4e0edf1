"""--debug: asyncio's debug mode and a slow-step threshold; a trio instrument naming the task."""

from __future__ import annotations

import logging
import time

import anyio
import pytest

from mandrill.obs.debug import backend_options, slow_callback_ms, watch_slow_steps


def test_backend_options():
    assert backend_options("asyncio", debug=True) == {"debug": True}
    assert backend_options("asyncio", debug=False) == {}
    assert backend_options("trio", debug=True) == {}


def test_slow_callback_threshold():
    assert slow_callback_ms(debug=False, configured=None) == 100
    assert slow_callback_ms(debug=True, configured=None) == 20
    assert slow_callback_ms(debug=True, configured=5) == 5


async def block_briefly() -> None:
    time.sleep(0.1)  # noqa: ASYNC251 - the slow step under test


async def test_a_slow_step_is_logged_with_the_task_name(caplog, backend_name):
    caplog.set_level(logging.WARNING)
    async with anyio.create_task_group() as tg:
        await tg.start(watch_slow_steps, 50)
        async with anyio.create_task_group() as inner:
            inner.start_soon(block_briefly, name="blocker")
        tg.cancel_scope.cancel()
    # asyncio (in debug mode, as the tests run it) names the task in its own warning.
    logger = "mandrill.obs.debug" if backend_name == "trio" else "asyncio"
    messages = [r.getMessage() for r in caplog.records if r.name == logger]
    assert any("'blocker'" in message for message in messages), messages


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_threshold_is_restored():
    import asyncio

    loop = asyncio.get_running_loop()
    before = loop.slow_callback_duration
    async with anyio.create_task_group() as tg:
        await tg.start(watch_slow_steps, 5)
        assert loop.slow_callback_duration == 0.005
        tg.cancel_scope.cancel()
    assert loop.slow_callback_duration == before


async def test_installing_the_watch_reports_no_step(caplog, backend_name):
    """The instrument is added in the middle of a step: that step's end is not timed."""
    caplog.set_level(logging.WARNING)
    async with anyio.create_task_group() as tg:
        await tg.start(watch_slow_steps, 50)
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.name == "mandrill.obs.debug"] == []
