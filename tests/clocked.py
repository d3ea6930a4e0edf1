"""Import ``anyio_backend`` from here in a test module whose tests are purely in-process:
on trio it adds a fresh autojumping MockClock per test, so timers pass instantly."""

from typing import Any

import pytest

from tests.conftest import clocked_backend


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return clocked_backend(request.param)


@pytest.fixture
def unit(anyio_backend: tuple[str, dict[str, Any]]) -> float:
    """Seconds per unit of test time: 1 under trio's MockClock (free), small on asyncio
    (which has no mock clock, so its timers really run)."""
    return 1.0 if anyio_backend[0] == "trio" else 0.02
