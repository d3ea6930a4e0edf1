"""``mandrill status``: the fleet as its ledger sees it, for a person or a program.

Three parts, each read at the ledger's own time (PostgreSQL's clock for a fleet): the
daemons that have not stopped, alive or silent (no heartbeat for ``--instance-timeout``:
dead, their claims resolved by the next daemon that looks); the restarts under way; the
hosts in cooldown (last restart + ``--min-restart-interval``), soonest free first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mandrill.ledger.base import FleetStatus
from mandrill.output import print_json_lines, print_rows
from mandrill.policy import format_duration

ALIVE = "alive"
SILENT = "silent"


def daemon_state(last_seen: float, now: float, instance_timeout: float) -> str:
    """``alive`` while its heartbeat is younger than ``instance_timeout``, else ``silent``."""
    return ALIVE if now - last_seen < instance_timeout else SILENT


def status_documents(status: FleetStatus, instance_timeout: float) -> list[dict[str, Any]]:
    """One JSON-ready document per daemon, claim and host in cooldown."""
    now = status.now
    documents: list[dict[str, Any]] = [
        {
            "kind": "daemon", "instance": d.instance_id, "host": d.host, "pid": d.pid,
            "backend": d.backend, "version": d.version, "started": iso(d.started),
            "last_heartbeat": iso(d.last_seen), "heartbeat_age": round(now - d.last_seen, 3),
            "state": daemon_state(d.last_seen, now, instance_timeout),
        }
        for d in status.daemons
    ]
    documents += [
        {"kind": "claim", "host": c.hostname, "since": iso(c.since), "owner": c.owner,
         "message_id": c.message_id}
        for c in status.claims
    ]
    documents += [
        {"kind": "cooldown", "host": c.hostname, "last_restart": iso(c.last_restart),
         "until": iso(c.until)}
        for c in status.cooldowns
    ]
    return documents


def print_status(status: FleetStatus, instance_timeout: float, *, as_json: bool) -> None:
    if as_json:
        print_json_lines(status_documents(status, instance_timeout))
        return
    now = status.now
    alive = sum(daemon_state(d.last_seen, now, instance_timeout) == ALIVE
                for d in status.daemons)
    print(f"daemons: {alive} alive, {len(status.daemons) - alive} silent")
    print_rows(
        ("instance", "backend", "version", "started (UTC)", "last heartbeat (UTC)", "state"),
        [(d.instance_id, d.backend, d.version, iso(d.started),
          f"{iso(d.last_seen)} ({ago(now - d.last_seen)})",
          daemon_state(d.last_seen, now, instance_timeout))
         for d in status.daemons],
    )
    print(f"restarts under way: {len(status.claims)}")
    print_rows(
        ("host", "since (UTC)", "owner", "message"),
        [(c.hostname, f"{iso(c.since)} ({ago(now - c.since)})", c.owner or "", c.message_id)
         for c in status.claims],
    )
    print(f"hosts in cooldown: {len(status.cooldowns)}")
    print_rows(
        ("host", "last restart (UTC)", "until (UTC)"),
        [(c.hostname, iso(c.last_restart), f"{iso(c.until)} (in {format_duration(c.until - now)})")
         for c in status.cooldowns],
    )


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def ago(seconds: float) -> str:
    return f"{format_duration(max(seconds, 0.0))} ago"
