"""Configuration: flags > ``MANDRILL_*`` environment > TOML file > defaults, validated once,
typed per command.

Every setting is declared once in :data:`SETTINGS` (:mod:`~mandrill.config.table`); the
CLI's flags, the environment variable names and the TOML keys all come from that table,
and every bad value becomes a one-line :class:`~mandrill.errors.ConfigError`
(:mod:`~mandrill.config.loader`, with the parsers of :mod:`~mandrill.config.values`).
:func:`command_config` turns the loaded values into the command's frozen dataclass
(:mod:`~mandrill.config.typed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mandrill.config.environment import unknown_variables
from mandrill.config.loader import load
from mandrill.config.table import (
    BY_NAME,
    ENV_PREFIX,
    GROUPS,
    HISTORY_OUTCOMES,
    SETTINGS,
    Setting,
    settings_for,
)
from mandrill.config.typed import (
    COMMANDS,
    BlockersConfig,
    CommandConfig,
    ExplainConfig,
    ExplainFlags,
    HistoryConfig,
    HistoryFlags,
    LedgerConfig,
    LogConfig,
    NotifyConfig,
    ObservabilityConfig,
    PublishConfig,
    PubSubConfig,
    ReplayConfig,
    ReplayFlags,
    RestarterConfig,
    ResumeConfig,
    ResumeFlags,
    RunConfig,
    SafetyConfig,
    SetupConfig,
    ShutdownConfig,
    SourceConfig,
    StatusConfig,
    StatusFlags,
    build,
)
from mandrill.config.values import (
    DURATION_UNITS,
    duration,
    format_duration,
    parse_since,
    positive_duration,
    positive_int,
    show,
)


def command_config(
    command: str,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> CommandConfig:
    """:func:`load` ``command``'s settings and build its configuration (``flags`` also
    gives the command-only flags, such as ``history --limit``). Raises
    :class:`~mandrill.errors.ConfigError` (one line)."""
    return build(COMMANDS[command], load(command, flags, environ, config_file), flags)


__all__ = [
    "BY_NAME",
    "COMMANDS",
    "DURATION_UNITS",
    "ENV_PREFIX",
    "GROUPS",
    "HISTORY_OUTCOMES",
    "SETTINGS",
    "BlockersConfig",
    "CommandConfig",
    "ExplainConfig",
    "ExplainFlags",
    "HistoryConfig",
    "HistoryFlags",
    "LedgerConfig",
    "LogConfig",
    "NotifyConfig",
    "ObservabilityConfig",
    "PubSubConfig",
    "PublishConfig",
    "ReplayConfig",
    "ReplayFlags",
    "RestarterConfig",
    "ResumeConfig",
    "ResumeFlags",
    "RunConfig",
    "SafetyConfig",
    "Setting",
    "SetupConfig",
    "ShutdownConfig",
    "SourceConfig",
    "StatusConfig",
    "StatusFlags",
    "command_config",
    "duration",
    "format_duration",
    "load",
    "parse_since",
    "positive_duration",
    "positive_int",
    "settings_for",
    "show",
    "unknown_variables",
]
