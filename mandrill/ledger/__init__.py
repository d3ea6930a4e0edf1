"""Ledgers: SQLite (embedded default) and PostgreSQL (a fleet of daemons)."""

from __future__ import annotations

from mandrill.ledger.base import Claim, HistoryRow, Ledger, SavedMessage
from mandrill.ledger.store import SQLLedger


async def open_ledger(url: str, *, outage_limit: float = float("inf")) -> SQLLedger:
    """Open the ledger a URL names: ``postgresql://…`` or a SQLite path (``:memory:`` too).

    Raises :class:`~mandrill.errors.LedgerError` when it cannot be opened.
    """
    if url.startswith(("postgresql://", "postgres://")):
        from mandrill.ledger.postgres import open_postgres_ledger

        return await open_postgres_ledger(url, outage_limit=outage_limit)
    from mandrill.ledger.sqlite import open_sqlite_ledger

    path = url.removeprefix("sqlite://")
    return await open_sqlite_ledger(path, outage_limit=outage_limit)


__all__ = ["Claim", "HistoryRow", "Ledger", "SQLLedger", "SavedMessage", "open_ledger"]
