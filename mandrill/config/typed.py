"""Typed, frozen configuration: a dataclass per concern, and one per command composed of
them, so that each command receives exactly the settings it uses and mypy checks the wiring.

:func:`build` fills them from the values :func:`~mandrill.config.loader.load` parsed with
the :data:`~mandrill.config.table.SETTINGS` table: a field takes the setting of its name
(or the one its ``setting`` metadata names, when the field's own name reads better:
``LedgerConfig.url`` ← ``ledger``). A concern's fields all
belong to its ``--help`` group (``GROUP``). ``tests/test_config.py`` checks that every
setting of the table lands in exactly one field of each command that takes it, and nowhere
else, so the table and these classes cannot drift apart.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import date
from typing import Any, ClassVar, TypeVar

# Imported at run time, not only for mypy: build() reads the fields' types.
from mandrill.grouping import GroupBy
from mandrill.notification import BodyTemplate
from mandrill.safety import HoursWindow

#: The ``GROUP`` of the command-only flags (``history --limit``): argparse's values, not
#: settings of the table.
COMMAND_FLAGS = "command"


# --- concerns ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """How every command logs."""

    GROUP: ClassVar[str] = "observability"
    log_format: str
    log_level: str


@dataclass(frozen=True, kw_only=True)
class PubSubConfig:
    """Where Pub/Sub is: every command that talks to it."""

    GROUP: ClassVar[str] = "source"
    project: str | None
    pubsub_api_root: str | None


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """Where ``run`` takes messages from (the embedded broker or Pub/Sub), how long it
    leases them, and the embedded demo's publisher."""

    GROUP: ClassVar[str] = "source"
    kind: str = field(metadata={"setting": "source"})
    pubsub: PubSubConfig
    subscription: str
    dead_letter_topic: str | None
    ack_deadline: float
    max_lease: float
    #: How long Pub/Sub may fail (its calls retried) before ``run`` stops; ``inf``: never.
    outage_limit: float = field(metadata={"setting": "source_outage_limit"})
    #: The embedded demo runs the talk's publisher.
    publish: bool
    rate: float | None
    seed: int | None


@dataclass(frozen=True, kw_only=True)
class LedgerConfig:
    """The ledger ``run`` records decisions in, and how it outlasts an outage."""

    GROUP: ClassVar[str] = "ledger"
    url: str = field(metadata={"setting": "ledger"})
    ledger_outage_limit: float
    outcome_journal: str
    instance_timeout: float
    retry_unknown: bool


@dataclass(frozen=True, kw_only=True)
class RestarterConfig:
    """How ``run`` restarts hosts, and how hosts are named."""

    GROUP: ClassVar[str] = "restarter"
    kind: str = field(metadata={"setting": "restarter"})
    domain: str
    max_attempts: int
    restart_latency: float
    restart_failure_rate: float
    restart_command: str | None
    restart_timeout: float
    gce_project: str | None
    gce_zone: str | None
    gce_api_root: str


@dataclass(frozen=True, kw_only=True)
class SafetyConfig:
    """Which restarts may go ahead: dry runs, intervals, hosts, days and hours, limits."""

    GROUP: ClassVar[str] = "safety"
    live: bool
    dry_run: bool
    min_restart_interval: float
    exclude: tuple[str, ...]
    only: tuple[str, ...]
    weekdays: frozenset[int] | None
    hours: tuple[HoursWindow, ...]
    skip_dates: frozenset[date]
    #: The dates the file named by ``--skip-dates-file`` holds.
    skip_dates_file: frozenset[date]
    timezone: str
    max_concurrent_restarts: int | None
    max_restarts: int | None
    max_restarts_window: float
    breaker_failures: int | None
    breaker_unknown: int | None
    breaker_window: float | None
    group_by: GroupBy | None
    max_concurrent_restarts_per_group: int | None


@dataclass(frozen=True, kw_only=True)
class BlockersConfig:
    """What is asked just before each restart, and may hold it back."""

    GROUP: ClassVar[str] = "blockers"
    alerts_url: str | None = field(metadata={"setting": "block_on_alerts"})
    alert_filter: str | None = field(metadata={"setting": "block_alert_filter"})
    command: str | None = field(metadata={"setting": "block_on_command"})
    timeout: float = field(metadata={"setting": "block_timeout"})


@dataclass(frozen=True, kw_only=True)
class ShutdownConfig:
    """How long a stopping daemon gives its work and its final settlement."""

    GROUP: ClassVar[str] = "shutdown"
    grace: float
    settle_timeout: float


@dataclass(frozen=True, kw_only=True)
class NotifyConfig:
    """The webhook told of every restart decision (none without ``url``)."""

    GROUP: ClassVar[str] = "notifications"
    url: str | None = field(metadata={"setting": "notify_url"})
    headers: tuple[tuple[str, str], ...] = field(metadata={"setting": "notify_header"})
    template: BodyTemplate | None = field(metadata={"setting": "notify_template"})
    timeout: float = field(metadata={"setting": "notify_timeout"})


@dataclass(frozen=True, kw_only=True)
class ObservabilityConfig:
    """The daemon's own: logs are every command's (:class:`LogConfig`)."""

    GROUP: ClassVar[str] = "observability"
    metrics_addr: str | None
    status_addr: str | None
    debug: bool
    slow_callback_ms: float | None
    profile: str | None


# --- commands ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """``mandrill run``: the daemon."""

    backend: str
    logs: LogConfig
    max_in_flight: int
    #: Stop after this many messages are done.
    count: int | None
    source: SourceConfig
    ledger: LedgerConfig
    restarter: RestarterConfig
    safety: SafetyConfig
    blockers: BlockersConfig
    shutdown: ShutdownConfig
    notify: NotifyConfig
    observability: ObservabilityConfig


@dataclass(frozen=True, kw_only=True)
class PublishConfig:
    """``mandrill publish``: the talk's publisher against a Pub/Sub topic."""

    backend: str
    logs: LogConfig
    pubsub: PubSubConfig
    topic: str
    #: Messages to publish (``None``: until stopped).
    count: int | None
    rate: float | None
    seed: int | None


@dataclass(frozen=True, kw_only=True)
class SetupConfig:
    """``mandrill setup``: create the topic, the subscription and the dead-letter topic."""

    backend: str
    logs: LogConfig
    pubsub: PubSubConfig
    topic: str
    subscription: str
    dead_letter_topic: str | None
    ack_deadline: float
    max_delivery_attempts: int


@dataclass(frozen=True, kw_only=True)
class HistoryFlags:
    """``history``'s own flags, as given (the command checks them)."""

    GROUP: ClassVar[str] = COMMAND_FLAGS
    host: str | None
    since: str | None
    outcome: str | None
    limit: str
    json: bool


@dataclass(frozen=True, kw_only=True)
class HistoryConfig:
    """``mandrill history``: read the ledger."""

    backend: str
    logs: LogConfig
    ledger: str
    domain: str
    flags: HistoryFlags


@dataclass(frozen=True, kw_only=True)
class ReplayFlags:
    """``replay``'s own flags, as given (the command checks them)."""

    GROUP: ClassVar[str] = COMMAND_FLAGS
    host: str | None
    since: str | None
    until: str | None
    dead_letters: bool
    dry_run: bool
    limit: str | None
    all: bool


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """``mandrill replay``: republish saved messages from the ledger."""

    backend: str
    logs: LogConfig
    pubsub: PubSubConfig
    topic: str
    ledger: str
    domain: str
    flags: ReplayFlags


@dataclass(frozen=True, kw_only=True)
class StatusFlags:
    """``status``'s own flags."""

    GROUP: ClassVar[str] = COMMAND_FLAGS
    json: bool


@dataclass(frozen=True, kw_only=True)
class StatusConfig:
    """``mandrill status``: the fleet as the ledger sees it."""

    backend: str
    logs: LogConfig
    ledger: str
    domain: str
    #: As the daemons are configured: who counts as alive, which host is in cooldown.
    instance_timeout: float
    retry_unknown: bool
    min_restart_interval: float
    flags: StatusFlags


@dataclass(frozen=True, kw_only=True)
class ExplainFlags:
    """``explain``'s own flags, as given (the command checks them)."""

    GROUP: ClassVar[str] = COMMAND_FLAGS
    host: str | None
    json: bool


@dataclass(frozen=True, kw_only=True)
class ExplainConfig:
    """``mandrill explain HOST``: would a message for HOST restart it now, and why not.
    It takes the daemon's settings of its decisions (give it the daemon's ``--config``)."""

    backend: str
    logs: LogConfig
    ledger: str
    domain: str
    #: With ``live`` and ``dry_run``, whether the daemon dry-runs.
    restarter: str
    retry_unknown: bool
    instance_timeout: float
    safety: SafetyConfig
    blockers: BlockersConfig
    flags: ExplainFlags


@dataclass(frozen=True, kw_only=True)
class ResumeFlags:
    """``resume``'s own flags, as given (the command checks them)."""

    GROUP: ClassVar[str] = COMMAND_FLAGS
    by: str | None


@dataclass(frozen=True, kw_only=True)
class ResumeConfig:
    """``mandrill resume``: close the fleet's restart-storm breaker."""

    backend: str
    logs: LogConfig
    ledger: str
    flags: ResumeFlags


CommandConfig = (
    RunConfig | PublishConfig | SetupConfig | HistoryConfig | ReplayConfig | StatusConfig
    | ExplainConfig | ResumeConfig
)

#: Each command's configuration.
COMMANDS: dict[str, type[CommandConfig]] = {
    "run": RunConfig,
    "publish": PublishConfig,
    "setup": SetupConfig,
    "history": HistoryConfig,
    "replay": ReplayConfig,
    "status": StatusConfig,
    "explain": ExplainConfig,
    "resume": ResumeConfig,
}

T = TypeVar("T")


def setting_name(f: Any) -> str:
    """The setting a dataclass field takes."""
    return str(f.metadata.get("setting", f.name))


def parts_of(cls: type) -> dict[str, type]:
    """``cls``'s fields that are dataclasses themselves (its concerns), by field name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if is_dataclass(hints[f.name])}


def build(cls: type[T], values: typing.Mapping[str, Any], flags: typing.Mapping[str, Any]) -> T:
    """``cls`` filled from ``values`` (the loaded settings) and, for command-only flags,
    ``flags`` (argparse's)."""
    nested = parts_of(cls)
    command_flags = getattr(cls, "GROUP", None) == COMMAND_FLAGS
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]  # T is a dataclass
        if f.name in nested:
            kwargs[f.name] = build(nested[f.name], values, flags)
        elif command_flags:
            kwargs[f.name] = flags[f.name]
        else:
            kwargs[f.name] = values[setting_name(f)]
    return cls(**kwargs)
