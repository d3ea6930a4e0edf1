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
from mandrill.parts import open_parts
from mandrill.service import ServiceSettings, serve
from mandrill.worker import WorkerSettings

log = logging.getLogger("mandrill")


def service_settings(cfg: Any) -> ServiceSettings:
    return ServiceSettings(
        max_in_flight=cfg.max_in_flight,
        grace=cfg.grace,
        settle_timeout=cfg.settle_timeout,
        max_lease=cfg.max_lease,
        stop_after=cfg.count,
    )


def worker_settings(cfg: Any) -> WorkerSettings:
    return WorkerSettings(
        domain=cfg.domain,
        min_restart_interval=cfg.min_restart_interval,
        max_attempts=cfg.max_attempts,
    )


async def run(cfg: Any) -> int:
    async with open_parts(cfg) as parts:
        log.info(
            "mandrill running on %s: source %s, ledger %s, restarter %s, up to %d in flight",
            cfg.backend, cfg.source, cfg.ledger, cfg.restarter, cfg.max_in_flight,
        )
        await serve(service_settings(cfg), worker_settings(cfg), parts)
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
