"""The fleet's restart-storm breaker, in the ledger's ``breakers`` table: a row each time it
opened, closed by ``mandrill resume``. While a row is open, no daemon of the fleet claims a
restart (:func:`mandrill.ledger.claims.claim_many` defers them).

Like :mod:`mandrill.ledger.sql`, every function runs inside a transaction (or a read) the
caller owns. :func:`check` and :func:`close` must run under the fleet lock
(:data:`mandrill.ledger.claims.FLEET_LOCK`), so that one daemon at a time opens it, and no
claim passes a breaker being opened.

For the status page and ``explain``: :func:`current` (inside any read) says whether the
breaker is open, since when, why and by which daemon; :meth:`SQLLedger.breaker_status
<mandrill.ledger.sqlledger.SQLLedger.breaker_status>` runs it as a query.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from mandrill.ledger.schema import Cursor, Dialect
from mandrill.policy import BreakerRule, Outcome, breaker_trips


@dataclass(frozen=True, slots=True)
class Breaker:
    """One opening of the breaker: when (the ledger's time), by which daemon instance, why;
    when it was closed and by whom (``None`` while it is open)."""

    id: int
    opened_at: float
    opened_by: str
    why: str
    closed_at: float | None = None
    closed_by: str | None = None

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    def held_detail(self) -> str:
        """What a message it holds back says (its deferral's detail)."""
        since = datetime.fromtimestamp(self.opened_at, UTC).isoformat(timespec="seconds")
        return (
            f"restart-storm breaker open since {since}: {self.why}; restarts wait for"
            " `mandrill resume`"
        )


_COLUMNS = "id, opened_at, opened_by, why, closed_at, closed_by"


def latest(cur: Cursor, d: Dialect) -> Breaker | None:
    """The breaker's last row: open, or the last one closed (``None``: it never opened)."""
    cur.execute(f"SELECT {_COLUMNS} FROM breakers ORDER BY id DESC LIMIT 1")
    row = cur.fetchone()
    return None if row is None else Breaker(int(row[0]), *row[1:])


def current(cur: Cursor, d: Dialect) -> Breaker | None:
    """The open breaker, or ``None`` while it is closed."""
    found = latest(cur, d)
    return found if found is not None and found.is_open else None


def check(
    cur: Cursor, d: Dialect, rule: BreakerRule | None, now: float, instance_id: str
) -> tuple[Breaker | None, bool]:
    """The breaker as a decision at ``now`` finds it: ``(its last row, opened now)``.

    Without a ``rule``, only read (an open breaker holds every daemon back, whatever its
    own settings). With one, and the breaker closed, count the restarts that failed or
    ended ``unknown`` within the rule's window (since the last ``resume`` at most: those
    were seen by whoever resumed) and open it, for ``instance_id``, when they are too many.
    Under the fleet lock with a rule (see the module's docstring).
    """
    last = latest(cur, d)
    if rule is None or (last is not None and last.is_open):
        return last, False
    since = now - rule.window
    if last is not None and last.closed_at is not None:
        since = max(since, last.closed_at)
    cur.execute(
        d.sql(
            "SELECT outcome, COUNT(*) FROM restarts WHERE finished_at > ?"
            f" AND outcome IN ('{Outcome.FAILED.value}', '{Outcome.UNKNOWN.value}')"
            " GROUP BY outcome"
        ),
        (since,),
    )
    counts = {outcome: int(n) for outcome, n in cur.fetchall()}
    why = breaker_trips(rule, counts.get(Outcome.FAILED, 0), counts.get(Outcome.UNKNOWN, 0))
    if why is None:
        return last, False
    cur.execute(
        d.sql("INSERT INTO breakers (opened_at, opened_by, why) VALUES (?, ?, ?) RETURNING id"),
        (now, instance_id, why),
    )
    (breaker_id,) = cur.fetchone()
    return Breaker(int(breaker_id), now, instance_id, why), True


def close(cur: Cursor, d: Dialect, now: float, by: str) -> Breaker | None:
    """Close the open breaker, as ``by`` at ``now``; returns it closed, or ``None`` if it
    was not open. Under the fleet lock."""
    found = current(cur, d)
    if found is None:
        return None
    cur.execute(
        d.sql("UPDATE breakers SET closed_at = ?, closed_by = ? WHERE closed_at IS NULL"),
        (now, by),
    )
    return replace(found, closed_at=now, closed_by=by)


__all__ = ["Breaker", "check", "close", "current", "latest"]
