"""``--max-concurrent-restarts-per-group`` in the ledger: the claims under way in each group
of hosts (the ``group_name`` of their restart rows), counted under the group's lock, so that
daemons claim in one group one at a time and never past its limit.

Like :mod:`mandrill.ledger.sql`, every function runs inside a transaction the caller owns.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from mandrill.grouping import GroupLimit
from mandrill.ledger.schema import Cursor, Dialect
from mandrill.message import Message
from mandrill.policy import Decision, Outcome, Reason, Verdict

#: The lock key of a group. ``*`` sorts after the fleet's key (``*fleet*``) and before every
#: host name (letters and digits), and no host name holds one: one global lock order,
#: fleet, groups, hosts (see :func:`mandrill.ledger.claims.lock_hosts`).
GROUP_LOCK_PREFIX = "*group*:"

#: Whether a claim's owner is gone (``claimant, decided_at, last_seen, stopped_at``): its
#: claim is an orphan, resolved as unknown by whoever finds it, and holds no place.
Orphaned = Callable[[str | None, float, float | None, float | None], bool]


def lock_keys(limit: GroupLimit, messages: Collection[Message]) -> list[str]:
    """The locks of the groups of ``messages``, in name order."""
    return sorted({GROUP_LOCK_PREFIX + limit.by.group_of(message) for message in messages})


class UnderWay:
    """The live claims in each group, as one transaction's claims see them: read once,
    then counted up as they claim."""

    __slots__ = ("_counts", "_limit")

    def __init__(self, limit: GroupLimit, counts: dict[str, int]) -> None:
        self._limit = limit
        self._counts = counts

    @classmethod
    def read(
        cls, cur: Cursor, d: Dialect, limit: GroupLimit, groups: Collection[str],
        orphaned: Orphaned,
    ) -> UnderWay:
        """The live claims of ``groups`` (an orphan holds no place: its owner is gone, and
        the next claim on its host, or a sweep, resolves it)."""
        cur.execute(
            d.sql(
                "SELECT r.group_name, r.owner, r.decided_at, i.last_seen, i.stopped_at"
                " FROM restarts r LEFT JOIN instances i ON i.instance_id = r.owner"
                f" WHERE r.outcome = '{Outcome.RESTARTING.value}'"
                f" AND r.group_name {d.in_list}"
            ),
            (d.list_param(sorted(groups)),),
        )
        counts: dict[str, int] = {}
        for group, *owner in cur.fetchall():
            if not orphaned(*owner):
                counts[group] = counts.get(group, 0) + 1
        return cls(limit, counts)

    def count(self, group: str) -> int:
        """The live claims in ``group`` (one of those read), as counted so far."""
        return self._counts.get(group, 0)

    def hold(self, group: str, decision: Decision) -> Decision:
        """``decision`` (a restart) if ``group`` has room, counted in it; else the deferral
        that holds it back."""
        under_way = self._counts.get(group, 0)
        if under_way >= self._limit.limit:
            return Decision(Verdict.BUSY, Reason.GROUP_LIMIT,
                            self._limit.held_detail(group, under_way), decision.failures)
        self._counts[group] = under_way + 1
        return decision


__all__ = ["GROUP_LOCK_PREFIX", "UnderWay", "lock_keys"]
