"""Every async test runs under asyncio (debug mode) and trio (on a fresh autojumping
MockClock when the test or its module is marked ``@pytest.mark.autojump``)."""

from __future__ import annotations

import signal
from typing import Any

import pytest

pytest_plugins = ["tests.fixtures.emulator", "tests.fixtures.metadata", "tests.fixtures.postgres"]


def pytest_configure(config: pytest.Config) -> None:
    """A shell runs a background job (``cmd &``) with SIGINT and SIGQUIT ignored, and every
    process it starts inherits that: the daemons the tests signal would ignore them too.
    Give them the dispositions a daemon normally starts with, however the suite was run."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    name, options = request.param
    if name == "trio" and request.node.get_closest_marker("autojump") is not None:
        import trio.testing

        return name, {**options, "clock": trio.testing.MockClock(autojump_threshold=0)}
    return name, dict(options)


@pytest.fixture
def backend_name(anyio_backend: tuple[str, dict[str, Any]]) -> str:
    return anyio_backend[0]


@pytest.fixture
def unit(anyio_backend: tuple[str, dict[str, Any]]) -> float:
    """Seconds per unit of test time: 1 under an autojumping MockClock (free), small
    elsewhere (asyncio has no mock clock, so its timers really run)."""
    return 1.0 if "clock" in anyio_backend[1] else 0.02
