"""The invariants of the message path under seeded fault schedules (see
``tests/reliability/faults.py``), on both backends and both databases: a few seeds here; the
reliability report runs hundreds (``python -m tests.reliability.report --only
fault-schedules``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.emulator import PubSubEmulator
from tests.reliability import faults
from tests.reliability.harness import postgres_schema

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.timeout(300)]

#: The suite's seeds, one for each database (the report runs hundreds on both): chosen so
#: that together they draw every kind of fault, and the skewed clock on PostgreSQL.
SQLITE_SEED = 5
POSTGRES_SEED = 120


def test_the_suites_seeds_draw_every_fault() -> None:
    sqlite, _ = faults.schedule(SQLITE_SEED, "sqlite")
    postgres, skewed = faults.schedule(POSTGRES_SEED, "postgres")
    assert {fault.kind for fault in sqlite + postgres} == set(faults.KINDS)
    assert skewed


@pytest.mark.parametrize("seed", [SQLITE_SEED])
async def test_sqlite(
    seed: int, backend_name: str, pubsub_emulator: PubSubEmulator, tmp_path: Path
) -> None:
    result = await faults.run_schedule(
        seed, backend_name, "sqlite", ledger_url=str(tmp_path / "ledger.db"),
        emulator=pubsub_emulator.host, workdir=tmp_path,
    )
    faults.check(result)


@pytest.mark.postgres
@pytest.mark.parametrize("seed", [POSTGRES_SEED])
async def test_postgres(
    seed: int, backend_name: str, pubsub_emulator: PubSubEmulator, postgres_admin_url: str,
    tmp_path: Path,
) -> None:
    async with postgres_schema(postgres_admin_url, "faults") as url:
        result = await faults.run_schedule(
            seed, backend_name, "postgres", ledger_url=url, emulator=pubsub_emulator.host,
            workdir=tmp_path,
        )
    faults.check(result)
