"""The ledgers the tests of this folder run against: SQLite (memory, file) and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mandrill.ledger import SQLLedger
from tests.ledger import Clock, running

POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)


def url_for(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite-memory":
        return ":memory:"
    if kind == "sqlite-file":
        return str(tmp_path / "ledger.db")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(params=["sqlite-memory", "sqlite-file", POSTGRES])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return url_for(request.param, request, tmp_path)


@pytest.fixture(params=["sqlite-file", POSTGRES])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return url_for(request.param, request, tmp_path)


@pytest.fixture
def clock() -> Clock:
    """The ledger's clock in these tests (a file may define its own)."""
    return Clock()


@pytest.fixture
async def ledger(ledger_url: str, clock: Clock) -> AsyncIterator[SQLLedger]:
    """A running ledger of each kind, on :func:`clock` (a file may define its own)."""
    async with running(ledger_url, clock) as opened:
        yield opened
