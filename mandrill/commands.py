"""The commands' bodies: each takes the validated configuration and returns an exit code."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from mandrill.cli import parse_since, print_json_lines
from mandrill.config import positive_int
from mandrill.errors import ConfigError
from mandrill.ledger import open_ledger
from mandrill.parts import open_parts, service_settings, worker_settings
from mandrill.service import serve

log = logging.getLogger("mandrill")


async def run(cfg: Any) -> int:
    workers = worker_settings(cfg)
    async with open_parts(cfg) as parts:
        log.info(
            "mandrill running on %s: source %s, ledger %s, restarter %s, up to %d in flight",
            cfg.backend, cfg.source, cfg.ledger, cfg.restarter, cfg.max_in_flight,
        )
        if workers.dry_run:
            log.warning(
                "DRY RUN: no host will be restarted; decisions are recorded as dry_run"
                " (pass --live to restart for real)"
            )
        counters = await serve(service_settings(cfg), workers, parts)
    if workers.dry_run:
        log.warning("DRY RUN: %d restarts would have happened", counters.dry_run)
    return 0


async def history(cfg: Any) -> int:
    args = cfg.args
    try:
        limit = positive_int(args.limit)
    except ValueError as exc:
        raise ConfigError(f"--limit: {exc}") from None
    since = parse_since(args.since, "--since")
    ledger = await open_ledger(cfg.ledger)
    try:
        rows = await ledger.history(hostname=args.host, since=since, limit=limit)
    finally:
        await ledger.aclose()
    if args.json:
        print_json_lines([
            {
                "host": row.hostname,
                "message_id": row.message_id,
                "decided_at": _iso(row.decided_at),
                "finished_at": _iso(row.finished_at),
                "outcome": row.outcome,
                "detail": row.detail,
            }
            for row in rows
        ])
        return 0
    table = Table("decided (UTC)", "host", "outcome", "detail", "message")
    for row in rows:
        table.add_row(_iso(row.decided_at), row.hostname, row.outcome, row.detail, row.message_id)
    Console().print(table)
    return 0


async def publish(cfg: Any) -> int:
    raise ConfigError("publish needs the Pub/Sub source, which is not available yet")


async def setup(cfg: Any) -> int:
    raise ConfigError("setup needs the Pub/Sub source, which is not available yet")


async def replay(cfg: Any) -> int:
    raise ConfigError("replay needs the Pub/Sub source, which is not available yet")


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
