"""The lag probe and its watchdog: a task blocking the loop is named, with its stack."""

from __future__ import annotations

import logging
import threading
import time

import anyio
import pytest

from mandrill.obs.lag import LagProbe


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mandrill-loop-watchdog"]


async def block_the_loop(done: anyio.Event) -> None:
    time.sleep(0.3)  # noqa: ASYNC251 - the bug under test: blocking the event loop
    done.set()


async def wait_for(condition, seconds: float = 5.0) -> None:
    """Poll a probe's reading: the probe has no event to wait on, by design (no hot-path cost)."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_a_blocking_task_is_reported_by_name_and_stack(caplog):
    caplog.set_level(logging.WARNING, logger="mandrill.obs.lag")
    probe = LagProbe(interval=0.02, slow_callback_ms=100)
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(probe.run)
        assert len(watchdogs()) == 1
        tg.start_soon(block_the_loop, done, name="blocker")
        await done.wait()
        # The report was made during the stall; the lag shows at the probe's next beat.
        await wait_for(lambda: probe.max_lag >= 0.15)
        tg.cancel_scope.cancel()
    assert watchdogs() == []  # joined with the task
    assert probe.stalls_total == 1
    stall = probe.stalls[-1]
    assert stall.task == "blocker"
    assert stall.held >= 0.1
    assert "in block_the_loop" in stall.stack
    assert "time.sleep(0.3)" in stall.stack
    # The stack starts at the task's own frame, not in the event loop's internals.
    assert "base_events.py" not in stall.stack
    assert "trio/_core" not in stall.stack
    (record,) = [r for r in caplog.records if r.name == "mandrill.obs.lag"]
    assert record.levelno == logging.WARNING
    assert "'blocker'" in record.getMessage()
    assert "block_the_loop" in record.getMessage()


async def test_many_short_steps_are_lag_not_a_stall():
    probe = LagProbe(interval=0.01, slow_callback_ms=100)

    async def busy() -> None:
        for _ in range(15):
            time.sleep(0.03)  # noqa: ASYNC251 - short blocking steps, each below the threshold
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        await tg.start(probe.run)
        await busy()
        await wait_for(lambda: probe.max_lag > 0.01)
        tg.cancel_scope.cancel()
    assert probe.stalls_total == 0
    assert probe.max_lag < 0.1


async def test_watchdog_off():
    probe = LagProbe(interval=0.01, slow_callback_ms=None)
    async with anyio.create_task_group() as tg:
        await tg.start(probe.run)
        assert watchdogs() == []
        assert probe.alive(1.0)
        tg.cancel_scope.cancel()
    assert probe.beat_age() is None


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        LagProbe(interval=0)
