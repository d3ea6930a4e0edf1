from __future__ import annotations

import random
from datetime import UTC, datetime

import anyio
import pytest

from mandrill.errors import RestartFailed
from mandrill.message import Message
from mandrill.restarters import SimulatedRestarter

MESSAGE = Message(
    "m-1", "web-1", "web-1.example.net", datetime(2026, 1, 1, tzinfo=UTC).timestamp(), None
)


async def outcomes(restarter: SimulatedRestarter, count: int) -> list[str]:
    results = []
    for _ in range(count):
        try:
            results.append(await restarter.restart(MESSAGE))
        except RestartFailed as exc:
            results.append(str(exc))
    return results


async def test_never_fails_at_rate_zero():
    restarter = SimulatedRestarter(0.0, 0.0, random.Random(1))
    assert await outcomes(restarter, 20) == ["simulated"] * 20


async def test_always_fails_at_rate_one():
    restarter = SimulatedRestarter(0.0, 1.0, random.Random(1))
    assert await outcomes(restarter, 5) == ["simulated failure"] * 5


async def test_same_seed_same_outcomes():
    first = await outcomes(SimulatedRestarter(0.0, 0.5, random.Random(42)), 40)
    second = await outcomes(SimulatedRestarter(0.0, 0.5, random.Random(42)), 40)
    assert first == second
    assert set(first) == {"simulated", "simulated failure"}


async def test_latency_is_bounded_and_cancellable():
    restarter = SimulatedRestarter(0.05, 0.0, random.Random(7))
    with anyio.fail_after(5):
        for _ in range(5):
            start = anyio.current_time()
            await restarter.restart(MESSAGE)
            assert anyio.current_time() - start < 1

    slow = SimulatedRestarter(3600.0, 0.0, random.Random(7))
    with anyio.move_on_after(0.05) as scope:
        await slow.restart(MESSAGE)
    assert scope.cancelled_caught


@pytest.mark.parametrize(("latency", "rate"), [(-1.0, 0.0), (float("nan"), 0.0), (0.0, 1.5)])
def test_bad_parameters(latency, rate):
    with pytest.raises(ValueError, match="must be"):
        SimulatedRestarter(latency, rate, random.Random())
