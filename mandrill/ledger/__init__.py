"""Ledgers: SQLite (embedded default) and PostgreSQL (a fleet of daemons)."""

from __future__ import annotations

import os

from mandrill.ledger.base import Claim, HistoryRow, Ledger, SavedMessage
from mandrill.ledger.journal import OutcomeJournal, default_journal_path
from mandrill.ledger.store import SQLLedger

#: ``open_ledger(journal=AUTO)``: the journal's default place for that ledger.
AUTO = "auto"


async def open_ledger(
    url: str, *, outage_limit: float = float("inf"), journal: str | None = None
) -> SQLLedger:
    """Open the ledger a URL names: ``postgresql://…`` or a SQLite path (``:memory:`` too).

    ``journal`` is the file keeping restart outcomes while the ledger is unreachable
    (:mod:`mandrill.ledger.journal`): a path, ``AUTO`` (beside a SQLite file; under
    ``$XDG_STATE_HOME/mandrill`` for PostgreSQL; none for ``:memory:``, which cannot be
    unreachable), or ``None`` (none: ``finish`` raises instead).

    Raises :class:`~mandrill.errors.LedgerError` when it cannot be opened.
    """
    if url.startswith(("postgresql://", "postgres://")):
        from mandrill.ledger.postgres import open_postgres_ledger

        ledger = await open_postgres_ledger(
            url, outage_limit=outage_limit, journal=_postgres_journal(url, journal)
        )
    else:
        from mandrill.ledger.sqlite import open_sqlite_ledger

        path = url.removeprefix("sqlite://")
        ledger = await open_sqlite_ledger(
            path, outage_limit=outage_limit, journal=_sqlite_journal(path, journal)
        )
    try:
        await ledger.check()
    except BaseException:
        await ledger.aclose()
        raise
    return ledger


def _postgres_journal(url: str, journal: str | None) -> OutcomeJournal | None:
    from mandrill.ledger.postgres import redact

    ledger_id = redact(url)
    path = default_journal_path(ledger_id) if journal == AUTO else journal
    return None if path is None else OutcomeJournal(path, ledger_id)


def _sqlite_journal(path: str, journal: str | None) -> OutcomeJournal | None:
    if path == ":memory:":  # nothing to outlast: it cannot become unreachable
        return None
    ledger_id = os.path.abspath(path)
    journal_path = ledger_id + "-outcomes.jsonl" if journal == AUTO else journal
    return None if journal_path is None else OutcomeJournal(journal_path, ledger_id)


__all__ = ["AUTO", "Claim", "HistoryRow", "Ledger", "SQLLedger", "SavedMessage", "open_ledger"]
