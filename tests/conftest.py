"""Every async test runs under asyncio (debug mode) and trio (a fresh autojumping MockClock
when the test asks for ``autojump``)."""

from __future__ import annotations

from typing import Any

import pytest

pytest_plugins = ["tests.fixtures.emulator", "tests.fixtures.metadata", "tests.fixtures.postgres"]


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    name, options = request.param
    return name, dict(options)


@pytest.fixture
def backend_name(anyio_backend: tuple[str, dict[str, Any]]) -> str:
    return anyio_backend[0]


def clocked_backend(param: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    name, options = param
    if name == "trio":
        import trio.testing

        return name, {**options, "clock": trio.testing.MockClock(autojump_threshold=0)}
    return name, dict(options)
