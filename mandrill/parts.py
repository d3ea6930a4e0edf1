"""Choosing and opening the adapters a configuration names: the one place that does it."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from mandrill.config import (
    NotifyConfig,
    RestarterConfig,
    RunConfig,
    SafetyConfig,
    SourceConfig,
)
from mandrill.errors import ConfigError
from mandrill.grouping import GroupLimit
from mandrill.ledger import open_ledger
from mandrill.ledger.base import Ledger
from mandrill.ledger.breaker import Breaker
from mandrill.message import Message
from mandrill.obs.counters import Counters
from mandrill.policy import BreakerRule, Outcome, RateLimit
from mandrill.publisher import publish_chaos
from mandrill.restarters.base import Restarter
from mandrill.safety import SafetyControls, TimeWindow, parse_timezone
from mandrill.service import Parts, ServiceSettings
from mandrill.sources.base import Source, Topic
from mandrill.sources.bridge import AsyncioBridge, open_asyncio_bridge
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import WorkerSettings

if TYPE_CHECKING:
    from mandrill.notify import Notifier

log = logging.getLogger(__name__)

#: Restarters that touch real hosts: they dry-run unless ``--live`` is given.
REAL_RESTARTERS = frozenset({"command", "gce"})


def is_dry_run(restarter: RestarterConfig, safety: SafetyConfig) -> bool:
    return safety.dry_run or (restarter.kind in REAL_RESTARTERS and not safety.live)


def service_settings(cfg: RunConfig) -> ServiceSettings:
    return ServiceSettings(
        max_in_flight=cfg.max_in_flight,
        grace=cfg.shutdown.grace,
        settle_timeout=cfg.shutdown.settle_timeout,
        max_lease=cfg.source.max_lease,
        stop_after=cfg.count,
    )


def worker_settings(cfg: RunConfig) -> WorkerSettings:
    safety = cfg.safety
    controls = safety_controls(safety)
    return WorkerSettings(
        domain=cfg.restarter.domain,
        min_restart_interval=safety.min_restart_interval,
        retry_unknown=cfg.ledger.retry_unknown,
        max_attempts=cfg.restarter.max_attempts,
        dry_run=is_dry_run(cfg.restarter, safety),
        max_concurrent_restarts=safety.max_concurrent_restarts,
        rate_limit=RateLimit(safety.max_restarts, safety.max_restarts_window)
        if safety.max_restarts
        else None,
        skip_checks=[controls.skip_reason] if controls is not None else [],
        breaker=breaker_rule(safety),
        groups=group_limit(safety),
    )


def group_limit(safety: SafetyConfig) -> GroupLimit | None:
    """The limit per group the settings describe, or None; raises ``ConfigError`` for one
    of the two settings without the other."""
    by, limit = safety.group_by, safety.max_concurrent_restarts_per_group
    if by is None and limit is None:
        return None
    if by is None:
        raise ConfigError("--max-concurrent-restarts-per-group needs --group-by")
    if limit is None:
        raise ConfigError("--group-by needs --max-concurrent-restarts-per-group")
    return GroupLimit(by, limit)


#: The restart-storm breaker's window unless ``--breaker-window`` says otherwise.
BREAKER_WINDOW = 3600.0


def breaker_rule(safety: SafetyConfig) -> BreakerRule | None:
    """The breaker the ``breaker_*`` settings describe, or None (off); raises
    ``ConfigError`` for a window given without a limit (a breaker that could never open)."""
    if safety.breaker_failures is None and safety.breaker_unknown is None:
        if safety.breaker_window is not None:
            raise ConfigError(
                "--breaker-window needs --breaker-failures or --breaker-unknown"
            )
        return None
    return BreakerRule(safety.breaker_failures, safety.breaker_unknown,
                       safety.breaker_window or BREAKER_WINDOW)


def ledger_subscription(source: SourceConfig) -> str:
    """What the ledger records messages under: message ids are unique per subscription."""
    if source.kind != "pubsub":
        return source.kind
    from mandrill.sources.pubsub import subscription_path

    return subscription_path(_project(source), source.subscription)


def safety_controls(safety: SafetyConfig) -> SafetyControls | None:
    window = None
    if safety.weekdays is not None or safety.hours:
        window = TimeWindow(safety.weekdays, safety.hours, parse_timezone(safety.timezone))
    if not (safety.exclude or safety.only or window):
        return None
    return SafetyControls(exclude=safety.exclude, only=safety.only, window=window)


@contextlib.asynccontextmanager
async def open_source(
    cfg: SourceConfig,
    backend: str,
    counters: Counters | None = None,
    bridge: AsyncioBridge | None = None,
) -> AsyncIterator[tuple[Source, Topic | None]]:
    """The source to pull from and, for the embedded broker, the topic feeding it;
    Pub/Sub's clients run on ``bridge`` (else on a bridge of their own, on ``backend``)."""
    if cfg.kind == "memory":
        broker = MemoryBroker(ack_deadline=cfg.ack_deadline)
        yield broker, broker
        return
    from mandrill.sources.pubsub import describe_error, open_pubsub_source

    def on_transient_error(what: str, error: BaseException, delay: float) -> None:
        if counters is not None:
            counters.pull_errors += 1
        log.warning("%s failed, retrying in %.1fs: %s", what, delay, describe_error(error))

    async with open_pubsub_source(
        project=_project(cfg),
        subscription=cfg.subscription,
        backend=backend,
        dead_letter_topic=cfg.dead_letter_topic,
        bridge=bridge,
        api_root=cfg.pubsub.pubsub_api_root,
        on_transient_error=on_transient_error,
    ) as source:
        yield source, None


@contextlib.asynccontextmanager
async def open_restarter(
    cfg: RestarterConfig, backend: str, rng: random.Random, bridge: AsyncioBridge | None = None
) -> AsyncIterator[Restarter]:
    """The restarter ``cfg`` names; the gce restarter's HTTP client runs on ``bridge``
    (else on a bridge of its own, on ``backend``)."""
    if cfg.kind == "simulated":
        from mandrill.restarters.simulated import SimulatedRestarter

        yield SimulatedRestarter(cfg.restart_latency, cfg.restart_failure_rate, rng)
    elif cfg.kind == "command":
        from mandrill.restarters.command import CommandRestarter

        try:
            template = _required(cfg.restart_command, "--restart-command", "--restarter command")
            restarter = CommandRestarter(template, timeout=cfg.restart_timeout)
        except ValueError as exc:
            raise ConfigError(f"--restart-command: {exc}") from None
        yield restarter
    else:
        from mandrill.restarters.gce import GceRestarter, GceSettingError

        async with contextlib.AsyncExitStack() as stack:
            if bridge is None:
                bridge = await stack.enter_async_context(open_asyncio_bridge(backend))
            try:
                gce = GceRestarter(
                    bridge, project=cfg.gce_project, zone=cfg.gce_zone, api_root=cfg.gce_api_root
                )
                await stack.enter_async_context(gce)
            except GceSettingError as exc:
                flag = "--gce-" + exc.setting.replace("_", "-")
                raise ConfigError(f"{flag}: {exc}") from None
            if not gce.zone:
                log.warning("no --gce-zone: every message must name its zone (attribute 'zone')")
            yield gce


@contextlib.asynccontextmanager
async def open_parts(cfg: RunConfig, counters: Counters | None = None) -> AsyncIterator[Parts]:
    """Open the source, ledger, restarter and notifier ``cfg`` names; close them in
    reverse order. Raises ``ConfigError`` or ``LedgerError``/``SourceError`` with one line."""
    rng = random.Random(cfg.source.seed)
    notifier = make_notifier(cfg.notify)
    pubsub, gce = cfg.source.kind == "pubsub", cfg.restarter.kind == "gce"
    async with contextlib.AsyncExitStack() as stack:
        bridge = None
        if pubsub or gce:
            # One asyncio thread (on trio) for every Google client; it closes last.
            bridge = await stack.enter_async_context(open_asyncio_bridge(cfg.backend))
            await check_google_credentials(
                bridge,
                pubsub=pubsub,
                pubsub_api_root=cfg.source.pubsub.pubsub_api_root,
                gce=gce and not is_dry_run(cfg.restarter, cfg.safety),
            )
        ledger: Ledger = await open_ledger(
            cfg.ledger.url, outage_limit=cfg.ledger.ledger_outage_limit,
            journal=cfg.ledger.outcome_journal, subscription=ledger_subscription(cfg.source),
            instance_timeout=cfg.ledger.instance_timeout, backend=cfg.backend,
        )
        stack.push_async_callback(ledger.aclose)
        source, topic = await stack.enter_async_context(
            open_source(cfg.source, cfg.backend, counters, bridge)
        )
        restarter = await stack.enter_async_context(
            open_restarter(cfg.restarter, cfg.backend, rng, bridge)
        )
        parts = Parts(source, ledger, restarter)
        if topic is not None and cfg.source.publish:
            parts.publisher = partial(
                publish_chaos, topic, count=cfg.count, rate=cfg.source.rate, rng=rng
            )
        if notifier is not None:
            add_notifier(parts, notifier)
        yield parts


async def check_google_credentials(
    bridge: AsyncioBridge, *, pubsub: bool, pubsub_api_root: str | None = None, gce: bool = False
) -> None:
    """Get one access token for the Google clients that will need one (Pub/Sub unless it is
    the emulator without an API root; a live gce restarter), so that missing credentials
    stop the command at start with one line (``CredentialsError``). Logs each transient
    failure as it happens."""
    from mandrill.google_cloud import check_credentials, describe_error

    scopes: list[str] = []
    if pubsub:
        from mandrill.sources.pubsub import PUBSUB_SCOPES, uses_credentials

        if uses_credentials(pubsub_api_root):
            scopes += PUBSUB_SCOPES
    if gce:
        from mandrill.restarters.gce import COMPUTE_SCOPE

        scopes.append(COMPUTE_SCOPE)
    if not scopes:
        return

    def on_retry(source: str, error: BaseException, delay: float) -> None:
        log.warning(
            "getting an access token from %s failed, retrying in %.1fs: %s",
            source, delay, describe_error(error),
        )

    await check_credentials(bridge, scopes, on_retry=on_retry)


def make_notifier(cfg: NotifyConfig) -> Notifier | None:
    """The notifier the ``notify_*`` settings describe, or None; raises ``ConfigError``
    (one line) for settings it cannot work with. Called before anything is opened."""
    if not cfg.url:
        if cfg.headers or cfg.template is not None:
            given = "--notify-header" if cfg.headers else "--notify-template"
            raise ConfigError(f"{given} needs --notify-url")
        return None
    from mandrill.notify import Notifier

    try:
        return Notifier(
            cfg.url,
            headers=cfg.headers,
            template=cfg.template,
            request_timeout=cfg.timeout,
        )
    except ValueError as exc:
        raise ConfigError(f"--notify-url: {exc}") from None


def add_notifier(parts: Parts, notifier: Notifier) -> None:
    """Run ``notifier`` beside the service and tell it every restart decision."""
    from mandrill.notify import Notification

    def on_decision(message: Message, outcome: Outcome, detail: str) -> None:
        notifier.notify(Notification.for_message(message, outcome, detail, datetime.now(UTC)))

    def on_breaker(breaker: Breaker) -> None:
        notifier.notify(Notification.for_breaker(breaker))

    parts.companions = [*parts.companions, notifier.run]
    parts.on_decision = on_decision
    parts.on_breaker = on_breaker


def _project(cfg: SourceConfig) -> str:
    return _required(cfg.pubsub.project, "--project", "--source pubsub")


def _required(value: str | None, flag: str, needed_by: str) -> str:
    if not value:
        raise ConfigError(f"{flag} is required with {needed_by}")
    return value
