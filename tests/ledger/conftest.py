"""The ledgers the tests of this folder run against: SQLite (memory, file) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

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
