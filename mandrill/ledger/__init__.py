"""Ledgers: SQLite (embedded default) and PostgreSQL (a fleet of daemons)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from mandrill.ledger.base import Claim, HistoryRow, Ledger, SavedMessage
from mandrill.ledger.journal import OutcomeJournal, default_journal_path
from mandrill.ledger.schema import SCHEMA_VERSION
from mandrill.ledger.sqlledger import INSTANCE_TIMEOUT, SQLLedger, new_instance
from mandrill.version import version

#: ``open_ledger(journal=AUTO)``: the journal's default place for that ledger.
AUTO = "auto"


async def open_ledger(
    url: str,
    *,
    outage_limit: float = float("inf"),
    journal: str | None = None,
    subscription: str = "",
    instance_timeout: float = INSTANCE_TIMEOUT,
    clock: Callable[[], float] = time.time,
    server_clock: bool = True,
    backend: str = "",
) -> SQLLedger:
    """Open the ledger a URL names: ``postgresql://…`` or a SQLite path (``:memory:`` too).
    A ledger of an older mandrill is upgraded (in one transaction); a newer one's refused.

    ``subscription`` names where the messages come from (message ids are unique within
    one); ``instance_timeout`` bounds how long this daemon's heartbeat may be missing
    before its restart claims are resolved by others; ``backend`` is recorded with this
    daemon's heartbeat. Times are PostgreSQL's clock, or ``clock`` (this machine's wall
    clock) for SQLite, and for PostgreSQL too with ``server_clock=False`` (tests).

    ``journal`` is the file keeping restart outcomes while the ledger is unreachable
    (:mod:`mandrill.ledger.journal`): a path, ``AUTO`` (beside a SQLite file; under
    ``$XDG_STATE_HOME/mandrill`` for PostgreSQL; none for ``:memory:``, which cannot be
    unreachable), or ``None`` (none: ``finish`` raises instead).

    Raises :class:`~mandrill.errors.LedgerError` when it cannot be opened.
    """
    path = sqlite_path(url)
    if path is None:
        from mandrill.ledger.postgres import open_postgres_ledger

        ledger = await open_postgres_ledger(
            url, outage_limit=outage_limit, journal=_postgres_journal(url, journal),
            subscription=subscription, instance_timeout=instance_timeout, clock=clock,
            server_clock=server_clock, instance=new_instance(backend, version()),
        )
    else:
        from mandrill.ledger.sqlite import open_sqlite_ledger

        ledger = await open_sqlite_ledger(
            path, outage_limit=outage_limit, journal=_sqlite_journal(path, journal),
            subscription=subscription, instance_timeout=instance_timeout, clock=clock,
            instance=new_instance(backend, version()),
        )
    try:
        await ledger.check()
    except BaseException:
        await ledger.aclose()
        raise
    return ledger


def sqlite_path(url: str) -> str | None:
    """The SQLite file (or ``:memory:``) a ledger URL names; ``None`` for PostgreSQL's
    ``postgresql://…`` (or ``postgres://…``). The one place that tells the two apart."""
    if url.startswith(("postgresql://", "postgres://")):
        return None
    return url.removeprefix("sqlite://")


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


__all__ = [
    "AUTO",
    "INSTANCE_TIMEOUT",
    "SCHEMA_VERSION",
    "Claim",
    "HistoryRow",
    "Ledger",
    "SQLLedger",
    "SavedMessage",
    "open_ledger",
    "sqlite_path",
]
