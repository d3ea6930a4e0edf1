"""The commands' bodies: each takes the validated configuration and returns an exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mandrill.config import (
    HISTORY_OUTCOMES,
    ExplainConfig,
    HistoryConfig,
    PublishConfig,
    PubSubConfig,
    ReplayConfig,
    ResumeConfig,
    RunConfig,
    SetupConfig,
    StatusConfig,
    parse_since,
    positive_int,
)
from mandrill.errors import ConfigError
from mandrill.ledger import open_ledger, sqlite_path
from mandrill.ledger.base import HistoryRow, Ledger
from mandrill.message import is_valid_label
from mandrill.output import print_json_lines, print_rows
from mandrill.parts import (
    check_google_credentials,
    controls,
    explain_controls,
    open_blockers,
    open_parts,
    service_settings,
    worker_settings,
)
from mandrill.publisher import MAX_BATCH, publish_chaos
from mandrill.service import serve
from mandrill.sources.base import Topic
from mandrill.sources.bridge import open_asyncio_bridge
from mandrill.sources.limits import MAX_SUBSCRIPTION_ACK_DEADLINE, MIN_SUBSCRIPTION_ACK_DEADLINE

if TYPE_CHECKING:
    from mandrill.obs.systemd import NotifySettings

log = logging.getLogger("mandrill")

if TYPE_CHECKING:
    from mandrill.obs.status import StatusBoard

T = TypeVar("T")


async def run(cfg: RunConfig) -> int:
    from mandrill.obs import debug
    from mandrill.obs.counters import Counters
    from mandrill.obs.metrics import Observability
    from mandrill.shutdown import Shutdown

    workers = worker_settings(cfg)
    systemd = systemd_settings()
    observability = Observability(
        counters=Counters(),
        shutdown=Shutdown(),
        metrics_addr=cfg.observability.metrics_addr,
        status_addr=cfg.observability.status_addr,
        slow_callback_ms=debug.slow_callback_ms(
            cfg.observability.debug, cfg.observability.slow_callback_ms
        ),
        debug=cfg.observability.debug,
        max_in_flight=cfg.max_in_flight,
        systemd=systemd,
        backend=cfg.backend,
    )
    # The probes answer from here on: while Pub/Sub cannot be reached at start, /healthz
    # says alive and /readyz not ready, with the reason.
    async with (
        observability.running(),
        open_parts(cfg, observability.counters, observability.health) as parts,
    ):
        if observability.wants_status:
            observability.status = status_board(cfg, parts.ledger)
        log.info(
            "mandrill running on %s: source %s, ledger %s, restarter %s, up to %d in flight",
            cfg.backend, cfg.source.kind, cfg.ledger.url, cfg.restarter.kind, cfg.max_in_flight,
        )
        if workers.dry_run:
            log.warning(
                "DRY RUN: no host will be restarted; decisions are recorded as dry_run"
                " (pass --live to restart for real)"
            )
        counters = await serve(
            service_settings(cfg), workers, parts, observability=observability
        )
    if workers.dry_run:
        log.warning("DRY RUN: %d restarts would have happened", counters.dry_run)
    return 0


def systemd_settings() -> NotifySettings | None:
    """What systemd's variables ask of a ``Type=notify`` daemon (None when not run so),
    taken out of the environment so that restart commands do not inherit them (as
    sd_notify's ``unset_environment`` does). Raises ``ConfigError`` for a malformed one."""
    from mandrill.obs import systemd

    try:
        settings = systemd.notify_settings(os.environ, os.getpid())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for name in systemd.ENVIRONMENT:
        os.environ.pop(name, None)
    if settings is not None:
        interval = settings.watchdog_interval
        log.info("systemd: notifying readiness%s",
                 f", watchdog pinged every {interval:g}s" if interval else "")
    return settings
def status_board(cfg: RunConfig, ledger: Ledger) -> StatusBoard:
    """The status page's board over the daemon's ledger and its controls."""
    from mandrill.obs.status import StatusBoard
    from mandrill.version import version

    instance = getattr(ledger, "instance", None)
    return StatusBoard(
        ledger, controls(cfg), instance_id=getattr(instance, "instance_id", ""),
        backend=cfg.backend, version=version(), breaker=partial(breaker_state, ledger),
    )


def breaker_state(ledger: Ledger) -> dict[str, Any]:
    """The restart-storm breaker as this daemon last read it from the ledger (each
    decision that claims, and each heartbeat, reads it), for the status page."""
    found = ledger.breaker()
    if found is None or not found.is_open:
        return {"open": False}
    return {"open": True, "since": _iso(found.opened_at), "why": found.why,
            "opened_by": found.opened_by}


async def history(cfg: HistoryConfig) -> int:
    """Decisions and dead letters, newest first: a table on a terminal, else every value
    in full (tab-separated, or JSON lines with ``--json``) for grep and scripts."""
    args = cfg.flags
    limit = _flag(positive_int, args.limit, "--limit")
    since = parse_since(args.since, "--since")
    hostname = host_filter(args.host, cfg.domain)
    outcomes = _outcomes(args.outcome)
    decided = outcomes - {DEAD_LETTER}
    ledger = await open_existing_ledger(cfg.ledger)
    try:
        rows: list[HistoryRow] = []
        if decided == frozenset(HISTORY_OUTCOMES) - {DEAD_LETTER}:
            rows = await ledger.history(hostname=hostname, since=since, limit=limit)
        elif decided:
            rows = await ledger.history_of_outcomes(
                decided, hostname=hostname, since=since, limit=limit
            )
        if DEAD_LETTER in outcomes:
            dead = await ledger.saved_messages(hostname=hostname, since=since, status=DEAD_LETTER)
            rows += [
                HistoryRow(m.hostname or "", m.message_id, m.first_seen, None, DEAD_LETTER,
                           m.reason)
                for m in dead
            ]
    finally:
        await ledger.aclose()
    rows.sort(key=lambda row: row.decided_at, reverse=True)
    rows = rows[:limit]
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
    print_rows(
        ("decided (UTC)", "host", "outcome", "detail", "message"),
        [(_iso(row.decided_at), row.hostname, row.outcome, row.detail, row.message_id)
         for row in rows],
    )
    return 0


async def explain(cfg: ExplainConfig) -> int:
    """Would a message for HOST restart it now, with the settings given (the daemon's
    ``--config``), and if not, every rule that says no: text, or one JSON object."""
    from mandrill.explain import explain as explain_host
    from mandrill.explain import host_message

    args = cfg.flags
    if args.host is None:
        raise ConfigError("explain needs a HOST: an instance name or a hostname")
    message = _flag(partial(host_message, domain=cfg.domain), args.host, "HOST")
    controls = explain_controls(cfg)
    ledger = await open_existing_ledger(cfg.ledger)
    try:
        async with open_blockers(cfg.blockers) as blockers:
            explanation = await explain_host(ledger, message, controls, blockers=blockers)
    finally:
        await ledger.aclose()
    if args.json:
        print_json_lines([explanation.to_json()])
    else:
        print(explanation.text())
    return 0


#: Dead letters are kept with the messages, not as a restart decision.
DEAD_LETTER = "dead_letter"


def host_filter(value: str | None, domain: str) -> str | None:
    """``--host``: a full hostname, or an instance name completed with ``--domain`` as
    the daemon does (``cattle-ab12`` → ``cattle-ab12.example.net``)."""
    if value is None:
        return None
    name = value.strip().lower().rstrip(".")
    if not name or not all(is_valid_label(label) for label in name.split(".")):
        raise ConfigError(f"--host: {value!r} is not an instance name or a hostname")
    return name if "." in name else f"{name}.{domain}"


def _outcomes(value: str | None) -> frozenset[str]:
    """``--outcome restarted,dead_letter`` → those outcomes; every one when not given."""
    if value is None:
        return frozenset(HISTORY_OUTCOMES)
    chosen = frozenset(item.strip().lower() for item in value.split(",") if item.strip())
    unknown = sorted(chosen - set(HISTORY_OUTCOMES))
    if unknown or not chosen:
        raise ConfigError(
            f"--outcome: {', '.join(unknown) or repr(value)} is not among"
            f" {', '.join(HISTORY_OUTCOMES)}"
        )
    return chosen


def _flag(parse: Callable[[object], T], value: object, flag: str) -> T:
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _project(cfg: PubSubConfig) -> str:
    """The project publish, setup and replay need (they have no --source to mention): the
    flag (or MANDRILL_PROJECT, or the config file), else GOOGLE_CLOUD_PROJECT (or
    GCLOUD_PROJECT), said in one line; ``run`` also asks the key file and the metadata
    server (``parts.with_default_projects``)."""
    if cfg.project:
        return str(cfg.project)
    from mandrill.google_cloud import PROJECT_VARIABLES

    for variable in PROJECT_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            log.info("--project not given: project %s, from %s", value, variable)
            return value
    raise ConfigError(
        "--project is required: the Google Cloud project (or set MANDRILL_PROJECT or"
        " GOOGLE_CLOUD_PROJECT, or project in the --config file)"
    )


async def setup(cfg: SetupConfig) -> int:
    from mandrill.sources.pubsub import setup_pubsub

    low, high = MIN_SUBSCRIPTION_ACK_DEADLINE, MAX_SUBSCRIPTION_ACK_DEADLINE
    if not low <= cfg.ack_deadline <= high:
        raise ConfigError(
            f"--ack-deadline: {cfg.ack_deadline:g}s is not between {low}s and {high}s"
        )
    project = _project(cfg.pubsub)
    async with open_asyncio_bridge(cfg.backend) as bridge:
        await check_google_credentials(
            bridge, pubsub=True, pubsub_api_root=cfg.pubsub.pubsub_api_root
        )
        done = await setup_pubsub(
            project=project,
            topic=cfg.topic,
            subscription=cfg.subscription,
            backend=cfg.backend,
            ack_deadline=int(cfg.ack_deadline),
            dead_letter_topic=cfg.dead_letter_topic,
            max_delivery_attempts=cfg.max_delivery_attempts,
            bridge=bridge,
            api_root=cfg.pubsub.pubsub_api_root,
        )
    for line in done:
        print(line)
    return 0


async def publish(cfg: PublishConfig) -> int:
    """The talk's publisher against a real topic, with a progress bar on a terminal."""
    _project(cfg.pubsub)  # a missing --project is said before anything starts
    console = Console(stderr=True)
    # auto_refresh would start a thread of rich's own; refresh from the loop instead.
    with Progress(
        TextColumn("publishing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("publish", total=cfg.count, rate="")
        started = anyio.current_time()

        def advance(n: int) -> None:
            done = progress.tasks[0].completed + n
            elapsed = max(anyio.current_time() - started, 1e-9)
            progress.update(task, advance=n, rate=f"{done / elapsed:,.0f}/s")
            progress.refresh()

        async with open_pubsub_topic_checked(cfg.pubsub, cfg.topic, cfg.backend) as t:
            published = await publish_chaos(
                t, count=cfg.count, rate=cfg.rate, rng=random.Random(cfg.seed),
                on_published=advance,
            )
    log.info("published %d messages to %s", published, cfg.topic)
    return 0


#: The longest name ``resume --by`` takes.
MAX_RESUMED_BY = 200


async def resume(cfg: ResumeConfig) -> int:
    """Close the fleet's restart-storm breaker, recording who (``--by``, else ``$USER``)
    and when (the ledger's time); says so on stdout, or that it was not open (exit 0
    both ways: resuming twice is harmless)."""
    by = resumed_by(cfg.flags.by, os.environ)
    ledger = await open_existing_ledger(cfg.ledger)
    try:
        closed = await ledger.resume(by)
    finally:
        await ledger.aclose()
    if closed is None:
        print("the restart-storm breaker is not open: nothing to resume")
        return 0
    log.warning("restart-storm breaker closed by %s: restarts resume", by)
    print(f"restart-storm breaker closed by {by} at {_iso(closed.closed_at)}; it was open"
          f" since {_iso(closed.opened_at)} (daemon {closed.opened_by}): {closed.why}")
    return 0


def resumed_by(flag: str | None, environ: Mapping[str, str]) -> str:
    """``--by``, else ``$USER``: one printable line. Raises :class:`ConfigError`."""
    name = flag if flag is not None else environ.get("USER", "")
    origin = "--by" if flag is not None else "$USER"
    name = name.strip()
    if not name:
        raise ConfigError("--by is required: $USER is not set" if flag is None
                          else "--by: must not be empty")
    if not name.isprintable() or len(name) > MAX_RESUMED_BY:
        raise ConfigError(f"{origin}: {name[:40]!r} is not a name of at most"
                          f" {MAX_RESUMED_BY} printable characters")
    return name


async def replay(cfg: ReplayConfig) -> int:
    """Republish saved messages (received, or dead-lettered with --dead-letters): those
    the filters choose, or every one with ``--all``; with ``--dry-run``, list them."""
    args = cfg.flags
    if not args.dry_run:
        _project(cfg.pubsub)  # a missing --project is said before the ledger is read
    since = parse_since(args.since, "--since")
    until = parse_since(args.until, "--until")
    hostname = host_filter(args.host, cfg.domain)
    limit = None if args.limit is None else _flag(positive_int, args.limit, "--limit")
    if not args.all and hostname is None and since is None and until is None:
        # Every message ever received, republished, would restart the whole fleet again.
        raise ConfigError(
            "replay: no --host, --since or --until given: pass --all to replay every saved"
            " message (try --dry-run first)"
        )
    ledger = await open_existing_ledger(cfg.ledger)
    try:
        saved = await ledger.saved_messages(
            hostname=hostname,
            since=since,
            until=until,
            status="dead_letter" if args.dead_letters else "received",
            limit=limit,
        )
    finally:
        await ledger.aclose()
    if args.dry_run:
        print_rows(
            ("first seen (UTC)", "host", "message", "reason"),
            [(_iso(m.first_seen), m.hostname or "", m.message_id, m.reason) for m in saved],
        )
        log.info("dry run: %d messages would be replayed to %s; none was", len(saved),
                 cfg.topic)
        return 0
    messages = [
        (m.data, {**m.attributes, "mandrill_replay_of": m.message_id}) for m in saved
    ]
    async with open_pubsub_topic_checked(cfg.pubsub, cfg.topic, cfg.backend) as t:
        for start in range(0, len(messages), MAX_BATCH):
            await t.publish(messages[start : start + MAX_BATCH])
    log.info("replayed %d messages to %s", len(messages), cfg.topic)
    print(len(messages))
    return 0


async def status(cfg: StatusConfig) -> int:
    """The daemons alive, the restarts under way, the hosts in cooldown (:mod:`mandrill.status`)."""
    from mandrill.status import print_status

    ledger = await open_existing_ledger(cfg.ledger)
    try:
        fleet = await ledger.fleet_status(cfg.min_restart_interval, cfg.retry_unknown)
    finally:
        await ledger.aclose()
    print_status(fleet, cfg.instance_timeout, as_json=cfg.flags.json)
    return 0


@contextlib.asynccontextmanager
async def open_pubsub_topic_checked(
    cfg: PubSubConfig, topic: str, backend: str
) -> AsyncIterator[Topic]:
    """``topic``, on a bridge of its own, once credentials were found to work."""
    from mandrill.sources.pubsub import open_pubsub_topic

    async with open_asyncio_bridge(backend) as bridge:
        await check_google_credentials(bridge, pubsub=True, pubsub_api_root=cfg.pubsub_api_root)
        async with open_pubsub_topic(
            project=_project(cfg),
            topic=topic,
            backend=backend,
            bridge=bridge,
            api_root=cfg.pubsub_api_root,
        ) as opened:
            yield opened


async def open_existing_ledger(url: str) -> Ledger:
    """The ledger to read from; a SQLite path that does not exist is an error, not a new
    empty ledger (a typo would otherwise show an empty history)."""
    path = sqlite_path(url)
    if path is not None and path != ":memory:" and not await anyio.Path(path).exists():
        raise ConfigError(f"--ledger: no ledger at {path}")
    return await open_ledger(url)


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
