"""Choosing and opening the adapters a configuration names: the one place that does it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from mandrill.blockers import Blocker, Blockers
from mandrill.config import (
    BlockersConfig,
    ExplainConfig,
    NotifyConfig,
    RestarterConfig,
    RunConfig,
    SafetyConfig,
    SourceConfig,
)
from mandrill.controls import Controls
from mandrill.errors import ConfigError
from mandrill.grouping import GroupLimit
from mandrill.ledger import open_ledger, sqlite_path
from mandrill.ledger.base import DeadLetterRecord, Ledger
from mandrill.ledger.breaker import Breaker
from mandrill.message import Message
from mandrill.obs.counters import Counters
from mandrill.policy import BreakerRule, Outcome, RateLimit, Rules
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
    from mandrill.obs.health import ServiceHealth

log = logging.getLogger(__name__)

#: Restarters that touch real hosts: they dry-run unless ``--live`` is given.
REAL_RESTARTERS = frozenset({"command", "gce"})


def is_dry_run(restarter: RestarterConfig, safety: SafetyConfig) -> bool:
    return _dry_run(restarter.kind, safety)


def _dry_run(restarter: str, safety: SafetyConfig) -> bool:
    return safety.dry_run or (restarter in REAL_RESTARTERS and not safety.live)


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
        rate_limit=rate_limit(safety),
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


def rate_limit(safety: SafetyConfig) -> RateLimit | None:
    """The fleet's rate limit (``--max-restarts`` per ``--max-restarts-window``), if any."""
    if not safety.max_restarts:
        return None
    return RateLimit(safety.max_restarts, safety.max_restarts_window)


def controls(cfg: RunConfig) -> Controls:
    """The controls the daemon decides by, for its status page and ``/explain``."""
    workers = worker_settings(cfg)
    return Controls(
        rules=workers.rules,
        safety=safety_controls(cfg.safety),
        dry_run=workers.dry_run,
        max_concurrent_restarts=workers.max_concurrent_restarts,
        max_attempts=workers.max_attempts,
        instance_timeout=cfg.ledger.instance_timeout,
        domain=workers.domain,
    )


def explain_controls(cfg: ExplainConfig) -> Controls:
    """The controls a daemon with ``cfg``'s settings decides by (``mandrill explain``)."""
    safety = cfg.safety
    return Controls(
        rules=Rules(safety.min_restart_interval, rate_limit(safety), cfg.retry_unknown,
                    breaker_rule(safety), group_limit(safety)),
        safety=safety_controls(safety),
        dry_run=_dry_run(cfg.restarter, safety),
        max_concurrent_restarts=safety.max_concurrent_restarts,
        instance_timeout=cfg.instance_timeout,
        domain=cfg.domain,
    )


def ledger_subscription(source: SourceConfig) -> str:
    """What the ledger records messages under: message ids are unique per subscription."""
    if source.kind != "pubsub":
        return source.kind
    from mandrill.sources.pubsub import subscription_path

    return subscription_path(_project(source), source.subscription)


def safety_controls(safety: SafetyConfig) -> SafetyControls | None:
    window = None
    skip_dates = safety.skip_dates | safety.skip_dates_file
    if safety.weekdays is not None or safety.hours or skip_dates:
        window = TimeWindow(safety.weekdays, safety.hours, parse_timezone(safety.timezone),
                            skip_dates)
    if not (safety.exclude or safety.only or window):
        return None
    return SafetyControls(exclude=safety.exclude, only=safety.only, window=window)


@contextlib.asynccontextmanager
async def open_source(
    cfg: SourceConfig,
    backend: str,
    counters: Counters | None = None,
    bridge: AsyncioBridge | None = None,
    health: ServiceHealth | None = None,
) -> AsyncIterator[tuple[Source, Topic | None]]:
    """The source to pull from and, for the embedded broker, the topic feeding it;
    Pub/Sub's clients run on ``bridge`` (else on a bridge of their own, on ``backend``).
    Pub/Sub's outage is one of ``health``'s readiness checks from its first call on."""
    if cfg.kind == "memory":
        broker = MemoryBroker(ack_deadline=cfg.ack_deadline)
        yield broker, broker
        return
    from mandrill.outage import Outage
    from mandrill.sources.pubsub import OUTAGE_RETRY, describe_error, open_pubsub_source

    def on_transient_error(what: str, error: BaseException, delay: float) -> None:
        # The outage logs its beginning and its end; each failure only at debug level.
        if counters is not None:
            counters.pull_errors += 1
        log.debug("%s failed, retrying in %.1fs: %s", what, delay, describe_error(error))

    outage = Outage("Pub/Sub", limit=cfg.outage_limit, setting="--source-outage-limit")
    if health is not None:
        health.add_checks({"source": outage.problem})
    async with open_pubsub_source(
        project=_project(cfg),
        subscription=cfg.subscription,
        backend=backend,
        dead_letter_topic=cfg.dead_letter_topic,
        bridge=bridge,
        api_root=cfg.pubsub.pubsub_api_root,
        retry=OUTAGE_RETRY,
        on_transient_error=on_transient_error,
        outage=outage,
    ) as source:
        yield source, None


def import_adapters(cfg: RunConfig) -> None:
    """Import the modules of the adapters ``cfg`` names, before the event loop starts.
    The heavy ones (psycopg, aiohttp, gcloud-aio) take 100 ms and more on a cold cache:
    imported on the loop, that is a stall the lag monitor reports and start-up signals wait
    behind. The opening functions below import them again, from the module cache."""
    if sqlite_path(cfg.ledger.url) is None:
        import mandrill.ledger.postgres
    else:
        import mandrill.ledger.sqlite
    if cfg.source.kind == "pubsub":
        import mandrill.sources.pubsub
    if cfg.restarter.kind == "gce":
        import mandrill.restarters.gce
    elif cfg.restarter.kind == "command":
        import mandrill.restarters.command  # noqa: F401


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
                project = _required(cfg.gce_project, "--gce-project", "--restarter gce")
                gce = GceRestarter(
                    bridge, project=project, zone=cfg.gce_zone, api_root=cfg.gce_api_root
                )
                await stack.enter_async_context(gce)
            except GceSettingError as exc:
                flag = "--gce-" + exc.setting.replace("_", "-")
                raise ConfigError(f"{flag}: {exc}") from None
            if not gce.zone:
                log.warning("no --gce-zone: every message must name its zone (attribute 'zone')")
            yield gce


@contextlib.asynccontextmanager
async def open_parts(
    cfg: RunConfig, counters: Counters | None = None, health: ServiceHealth | None = None
) -> AsyncIterator[Parts]:
    """Open the source, ledger, restarter and notifier ``cfg`` names; close them in
    reverse order; the source's readiness is one of ``health``'s checks as soon as it
    opens. Raises ``ConfigError`` or ``LedgerError``/``SourceError`` with one line."""
    rng = random.Random(cfg.source.seed)
    notifier = make_notifier(cfg.notify, counters)
    pubsub, gce = cfg.source.kind == "pubsub", cfg.restarter.kind == "gce"
    async with contextlib.AsyncExitStack() as stack:
        bridge = None
        if pubsub or gce:
            # One asyncio thread (on trio) for every Google client; it closes last.
            bridge = await stack.enter_async_context(open_asyncio_bridge(cfg.backend))
            cfg = await with_default_projects(cfg, bridge)
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
            open_source(cfg.source, cfg.backend, counters, bridge, health)
        )
        restarter = await stack.enter_async_context(
            open_restarter(cfg.restarter, cfg.backend, rng, bridge)
        )
        blockers = await stack.enter_async_context(open_blockers(cfg.blockers))
        parts = Parts(source, ledger, restarter, blockers=blockers or None)
        if topic is not None and cfg.source.publish:
            parts.publisher = partial(
                publish_chaos, topic, count=cfg.count, rate=cfg.source.rate, rng=rng
            )
        if notifier is not None:
            add_notifier(parts, notifier)
        yield parts


async def with_default_projects(cfg: RunConfig, bridge: AsyncioBridge) -> RunConfig:
    """``cfg`` with the Google Cloud projects it needs and names none of (Pub/Sub's
    ``--project``, the gce restarter's ``--gce-project``) taken from the environment, the
    key file or the metadata server (:func:`~mandrill.google_cloud.find_default_project`,
    asked once for both), and one info line saying where from.

    Raises ``ConfigError`` (one line, naming every way to set it) if none is found. Blocks
    for a few seconds at most while the metadata server does not answer; cancellable."""
    missing = []
    if cfg.source.kind == "pubsub" and not cfg.source.pubsub.project:
        missing.append("--project")
    if cfg.restarter.kind == "gce" and not cfg.restarter.gce_project:
        missing.append("--gce-project")
    if not missing:
        return cfg
    from mandrill.google_cloud import find_default_project

    flags = " and ".join(missing)
    found = await find_default_project(bridge, flags)
    log.info("%s not given: project %s, from %s", flags, found.project, found.source)
    source, restarter = cfg.source, cfg.restarter
    if "--project" in missing:
        pubsub = dataclasses.replace(source.pubsub, project=found.project)
        source = dataclasses.replace(source, pubsub=pubsub)
    if "--gce-project" in missing:
        restarter = dataclasses.replace(restarter, gce_project=found.project)
    return dataclasses.replace(cfg, source=source, restarter=restarter)

@contextlib.asynccontextmanager
async def open_blockers(cfg: BlockersConfig) -> AsyncIterator[Blockers]:
    """The blockers ``cfg`` names (none: an empty, false :class:`Blockers`), open until the
    block ends. Raises ``ConfigError`` (one line). ``mandrill explain`` asks them too:
    ``async with open_blockers(cfg.blockers) as blockers: await blockers.every(message)``."""
    if cfg.alert_filter and not cfg.alerts_url:
        raise ConfigError("--block-alert-filter needs --block-on-alerts")
    async with contextlib.AsyncExitStack() as stack:
        found: list[Blocker] = []
        if cfg.alerts_url:
            from mandrill.blockers.alerts import AlertsBlocker
            from mandrill.blockers.matchers import parse_alerts_url, parse_filter

            try:
                alerts = AlertsBlocker(parse_alerts_url(cfg.alerts_url),
                                       parse_filter(cfg.alert_filter or ""),
                                       time_limit=cfg.timeout)
            except ValueError as exc:
                raise ConfigError(f"--block-on-alerts: {exc}") from None
            found.append(await stack.enter_async_context(alerts))
        if cfg.command:
            from mandrill.blockers.command import CommandBlocker

            try:
                found.append(CommandBlocker(cfg.command, time_limit=cfg.timeout))
            except ValueError as exc:
                raise ConfigError(f"--block-on-command: {exc}") from None
        yield Blockers(found)


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


def make_notifier(cfg: NotifyConfig, counters: Counters | None = None) -> Notifier | None:
    """The notifier the ``notify_*`` settings describe (counting into ``counters``), or
    None; raises ``ConfigError`` (one line) for settings it cannot work with. Called before
    anything is opened."""
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
            counters=counters,
        )
    except ValueError as exc:
        raise ConfigError(f"--notify-url: {exc}") from None


def add_notifier(parts: Parts, notifier: Notifier) -> None:
    """Run ``notifier`` beside the service and tell it every restart decision (an
    ``unknown`` outcome included) and every dead letter."""
    from mandrill.notify import Notification

    def on_decision(message: Message, outcome: Outcome, detail: str) -> None:
        notifier.notify(Notification.for_message(message, outcome, detail, datetime.now(UTC)))

    def on_breaker(breaker: Breaker) -> None:
        notifier.notify(Notification.for_breaker(breaker))

    def on_dead_letter(letter: DeadLetterRecord) -> None:
        notifier.notify(Notification.for_dead_letter(letter, datetime.now(UTC)))

    parts.companions = [*parts.companions, notifier.run]
    parts.on_decision = on_decision
    parts.on_breaker = on_breaker
    parts.on_dead_letter = on_dead_letter


def _project(cfg: SourceConfig) -> str:
    return _required(cfg.pubsub.project, "--project", "--source pubsub")


def _required(value: str | None, flag: str, needed_by: str) -> str:
    if not value:
        raise ConfigError(f"{flag} is required with {needed_by}")
    return value
