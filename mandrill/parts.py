"""Choosing and opening the adapters a configuration names: the one place that does it."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from mandrill.errors import ConfigError
from mandrill.ledger import open_ledger
from mandrill.ledger.base import Ledger
from mandrill.publisher import publish_chaos
from mandrill.restarters.base import Restarter
from mandrill.service import Parts
from mandrill.sources.base import Source, Topic
from mandrill.sources.memory import MemoryBroker

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def open_source(cfg: Any) -> AsyncIterator[tuple[Source, Topic | None]]:
    """The source to pull from and, for the embedded broker, the topic feeding it."""
    if cfg.source == "memory":
        broker = MemoryBroker(ack_deadline=cfg.ack_deadline)
        yield broker, broker
        return
    from mandrill.sources.pubsub import open_pubsub_source

    project = require(cfg, "project")
    async with open_pubsub_source(
        project=project,
        subscription=cfg.subscription,
        backend=cfg.backend,
        dead_letter_topic=cfg.dead_letter_topic,
        service_file=cfg.service_file,
    ) as source:
        yield source, None


def build_restarter(cfg: Any, rng: random.Random) -> Restarter:
    if cfg.restarter == "simulated":
        from mandrill.restarters.simulated import SimulatedRestarter

        return SimulatedRestarter(cfg.restart_latency, cfg.restart_failure_rate, rng)
    raise ConfigError(f"--restarter {cfg.restarter} is not available yet")


@contextlib.asynccontextmanager
async def open_parts(cfg: Any) -> AsyncIterator[Parts]:
    """Open the source, ledger and restarter ``cfg`` names; close them in reverse order."""
    rng = random.Random(cfg.seed)
    async with contextlib.AsyncExitStack() as stack:
        ledger: Ledger = await open_ledger(cfg.ledger, outage_limit=cfg.ledger_outage_limit)
        stack.push_async_callback(ledger.aclose)
        source, topic = await stack.enter_async_context(open_source(cfg))
        publisher = None
        if topic is not None and cfg.publish:
            publisher = partial(publish_chaos, topic, count=cfg.count, rate=cfg.rate, rng=rng)
        yield Parts(source, ledger, build_restarter(cfg, rng), publisher=publisher)


def require(cfg: Any, name: str) -> str:
    value = getattr(cfg, name)
    if not value:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} is required with --source {cfg.source}")
    return str(value)
