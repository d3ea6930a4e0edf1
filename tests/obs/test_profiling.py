"""--profile: cProfile around anyio.run on either backend, loadable by pstats."""

from __future__ import annotations

import pstats

import anyio
import pytest

from mandrill.obs.profiling import profiled


async def spin() -> int:
    total = 0
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(busy_work)
    for number in range(1000):
        total += number
        await anyio.lowlevel.checkpoint()
    return total


async def busy_work() -> None:
    for _ in range(100):
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_profile_is_written_and_loads_in_pstats(tmp_path, backend):
    path = tmp_path / "run.prof"
    with profiled(path) as profiler:
        assert profiler is not None
        assert anyio.run(spin, backend=backend) == sum(range(1000))
    functions = {name for (_, _, name) in pstats.Stats(str(path)).stats}  # type: ignore[attr-defined]
    assert {"spin", "busy_work"} <= functions


def test_profile_is_written_when_the_run_fails(tmp_path):
    path = tmp_path / "failed.prof"

    async def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), profiled(path):
        anyio.run(fail, backend="trio")
    assert pstats.Stats(str(path)).total_calls > 0  # type: ignore[attr-defined]


def test_no_path_no_profiler():
    with profiled(None) as profiler:
        assert profiler is None


def test_unwritable_path_fails_before_running(tmp_path):
    ran = False
    with pytest.raises(FileNotFoundError), profiled(tmp_path / "missing" / "run.prof"):
        ran = True
    assert not ran
