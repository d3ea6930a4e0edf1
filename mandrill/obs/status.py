"""The status page's data (:class:`StatusBoard`): the fleet as the ledger records it, the
controls in force, and ``/explain``; read at most once a second however many clients ask.

The board reads through :meth:`Ledger.read <mandrill.ledger.base.Ledger.read>`: a
connection of its own, off the message path, opened by the first page anyone asks for. A
daemon whose status page nobody opens reads nothing, and one that is not asked to serve it
builds no board at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio

from mandrill.controls import Controls
from mandrill.explain import Explanation, explain, host_message
from mandrill.ledger.base import Ledger
from mandrill.ledger.fleet import FleetView, fleet_view
from mandrill.policy import format_duration

#: How long a snapshot serves every client before the ledger is read again.
MAX_AGE = 1.0
#: How long the parts of a snapshot that scan the ledger's tables (hosts in cooldown, dead
#: letters, the rate limit's count) are kept before they are read again: their cost grows
#: with the ledger's size (the schema has no index on time), the other parts' does not.
SCAN_MAX_AGE = 15.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the page shows, at one moment of the ledger (``fleet.now``)."""

    fleet: FleetView
    controls: Controls
    #: This daemon: its instance id in the ledger, backend and version.
    instance_id: str
    backend: str
    version: str
    #: This machine's time (of the window), as an aware datetime.
    wall_time: datetime
    #: The restart-storm breaker's state, once there is one (``None``: no breaker).
    breaker: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        fleet, now = self.fleet, self.fleet.now
        timeout = self.controls.instance_timeout
        interval = self.controls.rules.min_interval
        return {
            "generated_at": _iso(now),
            "dry_run": self.controls.dry_run,
            "daemon": {"instance_id": self.instance_id, "backend": self.backend,
                       "version": self.version, "dry_run": self.controls.dry_run},
            "daemons": [
                {**_times(asdict(row), "started", "last_seen", "stopped_at"),
                 "last_seen_ago": _ago(now, row.last_seen),
                 "state": row.state(now, timeout), "this": row.instance_id == self.instance_id}
                for row in fleet.daemons
            ],
            "under_way": [
                {"host": row.hostname, "message_id": row.message_id, "since": _iso(row.since),
                 "for": _ago(now, row.since), "owner": row.owner,
                 "owner_gone": row.orphaned(now, timeout)}
                for row in fleet.under_way
            ],
            "cooldown": {
                "total": fleet.cooldown_total,
                "hosts": [
                    {"host": row.hostname, "last_restart": _iso(row.last_restart),
                     "eligible_at": _iso(row.last_restart + interval),
                     "eligible_in": format_duration(max(0.0, row.last_restart + interval - now))}
                    for row in fleet.cooldown
                ],
            },
            "decisions": [
                {"decided_at": _iso(row.decided_at), "host": row.hostname,
                 "outcome": row.outcome, "reason": row.reason, "detail": row.detail,
                 "message_id": row.message_id, "owner": row.owner,
                 "finished_at": _iso(row.finished_at)}
                for row in fleet.decisions
            ],
            "dead_letters": [
                {"message_id": row.message_id, "first_seen": _iso(row.first_seen),
                 "host": row.hostname, "detail": row.detail, "deliveries": row.deliveries}
                for row in fleet.dead_letters
            ],
            "controls": {
                **self.controls.to_json(self.wall_time),
                "rate_limit_used": None if fleet.fleet_restarts is None
                else fleet.fleet_restarts.count,
            },
            "breaker": None if self.breaker is None else dict(self.breaker),
            "scanned_at": _iso(fleet.scanned_at),
        }


class StatusBoard:
    """Snapshots of the fleet for ``/status`` and ``/status.json``, and ``/explain``."""

    def __init__(
        self,
        ledger: Ledger,
        controls: Controls,
        *,
        instance_id: str = "",
        backend: str = "",
        version: str = "",
        max_age: float = MAX_AGE,
        scan_max_age: float = SCAN_MAX_AGE,
        wall_clock: Callable[[], float] = time.time,
        breaker: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        """``breaker``, once there is one, says its state for each snapshot."""
        self.ledger = ledger
        self.controls = controls
        self.instance_id = instance_id
        self.backend = backend
        self.version = version
        self.max_age = max_age
        self.scan_max_age = scan_max_age
        self._wall_clock = wall_clock
        self._breaker = breaker
        self._lock = anyio.Lock()
        self._taken: float | None = None
        self._snapshot: Snapshot | None = None
        self._scanned: float | None = None
        #: Rendered forms of the current snapshot, by name (json, html…).
        self._rendered: dict[str, bytes] = {}
        #: Snapshots read from the ledger, and those that scanned its tables (for tests).
        self.reads = 0
        self.scans = 0

    async def snapshot(self) -> Snapshot:
        """The latest snapshot, read again once it is older than ``max_age``: clients that
        ask meanwhile wait for that one read. Raises :class:`~mandrill.errors.LedgerError`."""
        async with self._lock:
            now = anyio.current_time()
            if self._snapshot is None or self._taken is None or now - self._taken >= self.max_age:
                rescan = self._scanned is None or now - self._scanned >= self.scan_max_age
                earlier = None if rescan or self._snapshot is None else self._snapshot.fleet
                fleet = await self.ledger.read(
                    partial(_read_fleet, self.controls.rules, earlier)
                )
                self.reads += 1
                if rescan:
                    self.scans += 1
                    self._scanned = now
                self._snapshot = Snapshot(
                    fleet, self.controls, self.instance_id, self.backend, self.version,
                    datetime.fromtimestamp(self._wall_clock(), UTC),
                    self._breaker() if self._breaker is not None else None,
                )
                self._taken = anyio.current_time()
                self._rendered = {}
            return self._snapshot

    async def rendered(self, name: str, render: Callable[[Snapshot], bytes]) -> bytes:
        """``render(snapshot)``, rendered once per snapshot for every client."""
        snapshot = await self.snapshot()
        if snapshot is not self._snapshot:  # a newer one came while this client waited
            return render(snapshot)
        found = self._rendered.get(name)
        if found is None:
            found = self._rendered[name] = render(snapshot)
        return found

    async def json(self) -> bytes:
        return await self.rendered("json", _json)

    async def explain(self, host: str) -> Explanation:
        """``/explain?host=``: raises ``ValueError`` (one line) for a bad host, and
        :class:`~mandrill.errors.LedgerError`."""
        message = host_message(host, self.controls.domain)
        return await explain(self.ledger, message, self.controls, wall_clock=self._wall_clock)


def _read_fleet(rules: Any, earlier: FleetView | None, cur: Any, d: Any,
                now: float) -> FleetView:
    return fleet_view(cur, d, now, rules, earlier=earlier)


def _json(snapshot: Snapshot) -> bytes:
    return json.dumps(snapshot.to_json(), indent=1).encode()


def _times(row: dict[str, Any], *names: str) -> dict[str, Any]:
    return {**row, **{name: _iso(row[name]) for name in names}}


def _ago(now: float, then: float | None) -> str | None:
    return None if then is None else format_duration(max(0.0, now - then))


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


__all__ = ["MAX_AGE", "Snapshot", "StatusBoard"]
