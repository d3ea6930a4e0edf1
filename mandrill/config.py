"""Configuration: flags > ``MANDRILL_*`` environment > TOML file > defaults, validated once.

Every setting is declared once in :data:`SETTINGS`; the CLI's flags, the environment
variable names and the TOML keys all come from that table, and every bad value becomes a
one-line :class:`~mandrill.errors.ConfigError`.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mandrill import safety
from mandrill.errors import ConfigError
from mandrill.message import DEFAULT_DOMAIN, validate_domain

ENV_PREFIX = "MANDRILL_"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def duration(value: object) -> float:
    """``"7d"``, ``"90s"``, ``"250ms"``, ``1.5`` (seconds) → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 10m, 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (examples: 30s, 10m, 7d, 250ms)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} must be a finite, non-negative duration")
    return seconds


def positive_duration(value: object) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be a duration > 0")
    return seconds


def positive_int(value: object) -> int:
    number = _int(value)
    if number < 1:
        raise ValueError(f"{value!r} must be at least 1")
    return number


def optional_positive_int(value: object) -> int | None:
    return None if value in (None, "", "none") else positive_int(value)


def fraction(value: object) -> float:
    number = _float(value)
    if not 0 <= number <= 1:
        raise ValueError(f"{value!r} must be between 0 and 1")
    return number


def optional_rate(value: object) -> float | None:
    """Messages per second; 0 or ``max`` means as fast as possible."""
    if value in (None, "max", "0", 0):
        return None
    number = _float(value)
    if number < 0:
        raise ValueError(f"{value!r} must be a rate >= 0 per second (0 or 'max': unlimited)")
    return number


def choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return text

    return parse


def boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false)")


def text(value: object) -> str:
    result = str(value).strip()
    if not result:
        raise ValueError("must not be empty")
    return result


def optional_text(value: object) -> str | None:
    return str(value).strip() or None if value is not None else None


def optional_int(value: object) -> int | None:
    return None if value in (None, "") else _int(value)


def domain(value: object) -> str:
    return validate_domain(str(value).strip())


def text_list(value: object) -> list[str]:
    """A comma-separated string, or a TOML array of strings."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    try:
        return int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def _float(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(str(value).strip()) if not isinstance(value, int | float) else float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _parse_patterns(value: object) -> tuple[str, ...]:
    return safety.parse_patterns(value if isinstance(value, list) else str(value))


def _optional(parse: Callable[[str], Any]) -> Callable[[object], Any]:
    def parse_optional(value: object) -> Any:
        return None if value in (None, "") else parse(str(value))

    return parse_optional


def _zone(value: object) -> str:
    name = str(value).strip()
    safety.parse_timezone(name)
    return name


def _metrics_addr(value: object) -> str | None:
    from mandrill.obs.metrics import parse_addr

    if value in (None, ""):
        return None
    parse_addr(str(value))
    return str(value).strip()


def _api_root(value: object) -> str | None:
    """An http(s) URL of a Google API endpoint; a bare host gets the API's ``/v1`` path."""
    if value in (None, ""):
        return None
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(
            f"{value!r} is not an http(s) URL such as https://europe-west1-pubsub.googleapis.com"
        )
    return text if parts.path else f"{text}/v1"


def _positive_duration(value: object) -> float:
    seconds = duration(value)
    if seconds == 0:
        raise ValueError(f"{value!r} must be longer than 0")
    return seconds


def _notify_headers(value: object) -> tuple[tuple[str, str], ...]:
    from mandrill.notification import parse_headers

    return parse_headers(value, os.environ)


def _notify_template(value: object) -> Any:
    from mandrill.notification import BodyTemplate

    if value in (None, ""):
        return None
    return BodyTemplate.from_option(str(value))


def _optional_ms(value: object) -> float | None:
    if value in (None, ""):
        return None
    number = _float(value)
    if number < 0:
        raise ValueError(f"{value!r} must be >= 0 milliseconds")
    return number


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[object], Any]
    default: Any
    help: str
    #: The commands that take this setting.
    commands: frozenset[str]
    metavar: str | None = None
    #: A boolean switch (``--live``) rather than a flag taking a value.
    switch: bool = False
    #: A flag that may be given several times; the parser receives the list.
    repeat: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


RUN = frozenset({"run"})
PUBSUB = frozenset({"run", "publish", "setup", "replay"})
LEDGER = frozenset({"run", "history", "replay"})
ALL = frozenset({"run", "publish", "setup", "history", "replay"})


def _s(name: str, parse: Callable[[object], Any], default: Any, help: str,
       commands: frozenset[str], metavar: str | None = None, switch: bool = False,
       repeat: bool = False) -> Setting:
    return Setting(name, parse, default, help, commands, metavar, switch, repeat)


SETTINGS: tuple[Setting, ...] = (
    _s("backend", choice("asyncio", "trio"), "asyncio", "event loop to run on", ALL),
    _s("log_format", choice("auto", "text", "json"), "auto",
       "log format; auto: text on a terminal, JSON otherwise", ALL),
    _s("log_level", choice("debug", "info", "warning", "error"), "info", "log level", ALL),
    _s("source", choice("memory", "pubsub"), "memory",
       "memory: the embedded in-process broker; pubsub: Google Cloud Pub/Sub",
       RUN),
    _s("project", optional_text, None, "Google Cloud project (pubsub)", PUBSUB),
    _s("subscription", optional_text, "mandrill", "Pub/Sub subscription to pull from", PUBSUB),
    _s("topic", optional_text, "mandrill", "Pub/Sub topic to publish to", PUBSUB),
    _s("dead_letter_topic", optional_text, None,
       "topic receiving invalid and poison messages", PUBSUB),
    _s("pubsub_api_root", _api_root, None,
       "Pub/Sub endpoint, e.g. a regional https://europe-west1-pubsub.googleapis.com"
       " (default: PUBSUB_EMULATOR_HOST's emulator, without credentials, else the global"
       " endpoint); always used with credentials", PUBSUB, "URL"),
    _s("ledger", text, "mandrill.db",
       "SQLite file (or :memory:), or postgresql://… for a fleet", LEDGER, "URL"),
    _s("ledger_outage_limit", duration, 60.0,
       "how long the ledger may be unreachable before the daemon stops", RUN),
    _s("outcome_journal", text, "auto",
       "file keeping restart outcomes while the ledger is unreachable (auto: beside a"
       " SQLite ledger; $XDG_STATE_HOME/mandrill/ for PostgreSQL)", RUN, "PATH"),
    _s("domain", domain, DEFAULT_DOMAIN, "DNS domain appended to instance names", RUN),
    _s("min_restart_interval", duration, 7 * 86400.0,
       "do not restart a host restarted more recently than this", RUN),
    _s("max_in_flight", positive_int, 256, "messages held at once (backpressure)", RUN),
    _s("grace", duration, 10.0, "time in-flight work gets to finish at shutdown", RUN),
    _s("settle_timeout", duration, 5.0,
       "bound on the final nack/ack flush at shutdown", RUN),
    _s("ack_deadline", duration, 10.0,
       "run: the embedded broker's ack deadline; setup: the subscription's (10s to 600s)",
       frozenset({"run", "setup"})),
    _s("max_delivery_attempts", positive_int, 10,
       "setup: deliveries after which Pub/Sub forwards a message to the dead-letter topic",
       frozenset({"setup"})),
    _s("max_lease", duration, 3600.0, "longest a message is kept leased while worked on", RUN),
    _s("instance_timeout", positive_duration, 30.0,
       "a daemon silent in the ledger this long is dead: its restart claims are resolved as"
       " 'unknown' by the others (it heartbeats 6 times as often)", RUN),
    _s("retry_unknown", boolean, False,
       "restart again a host whose restart outcome is unknown (its daemon died mid-restart)"
       " instead of counting it as restarted", RUN),
    _s("max_attempts", positive_int, 5,
       "failed restarts of one message before it is dead-lettered", RUN),
    _s("restarter", choice("simulated", "command", "gce"), "simulated",
       "how hosts are restarted", RUN),
    _s("restart_latency", duration, 0.5,
       "simulated restarter: restarts take up to this long", RUN),
    _s("restart_failure_rate", fraction, 0.1,
       "simulated restarter: share of restarts that fail", RUN),
    _s("seed", optional_int, None, "random seed for the simulated parts", RUN | {"publish"}),
    _s("count", optional_positive_int, None,
       "run: stop after N messages are done; publish: publish N messages",
       frozenset({"run", "publish"}), "N"),
    _s("rate", optional_rate, 20.0,
       "messages per second the publisher sends (0: as fast as possible)",
       frozenset({"run", "publish"}), "PER_SECOND"),
    _s("publish", boolean, True, "embedded demo: run the talk's publisher in-process", RUN),
    # -- real restarters and their safety controls --
    _s("restart_command", optional_text, None,
       "command restarter: argv template, e.g. 'ssh {hostname} sudo systemctl reboot'", RUN),
    _s("restart_timeout", duration, 60.0, "command restarter: kill a restart after this", RUN),
    _s("gce_project", optional_text, None, "gce restarter: project (else the message's)", RUN),
    _s("gce_zone", optional_text, None, "gce restarter: zone (else the message's)", RUN),
    _s("gce_api_root", text, "https://compute.googleapis.com/compute/v1",
       "gce restarter: Compute Engine API root", RUN, "URL"),
    _s("live", boolean, False,
       "really restart with a real restarter (command, gce); without it they dry-run", RUN),
    _s("dry_run", boolean, False, "decide and record, restart nothing (any restarter)", RUN),
    _s("exclude", _parse_patterns, (), "never restart hosts matching these globs (comma list)",
       RUN, "GLOBS"),
    _s("only", _parse_patterns, (), "restart only hosts matching these globs (comma list)",
       RUN, "GLOBS"),
    _s("weekdays", _optional(safety.parse_weekdays), None,
       "restart only on these days, e.g. mon-fri", RUN, "DAYS"),
    _s("hours", _optional(safety.parse_hours), (),
       "restart only in these hours, e.g. 09:00-17:00", RUN, "HH:MM-HH:MM"),
    _s("timezone", _zone, "UTC", "time zone of --weekdays and --hours", RUN, "ZONE"),
    _s("max_concurrent_restarts", optional_positive_int, None,
       "restarts under way at once in this daemon", RUN, "N"),
    _s("max_restarts", optional_positive_int, None,
       "fleet rate limit: restarts per --max-restarts-window across all daemons", RUN, "N"),
    _s("max_restarts_window", duration, 3600.0, "fleet rate limit window", RUN),
    _s("notify_url", optional_text, None,
       "POST a JSON document for every restart and skip to this URL", RUN, "URL"),
    _s("notify_header", _notify_headers, (),
       "notifications: a request header; ${VAR} takes VAR from the environment (repeat the"
       " flag for more; one per line in the environment variable; a list in TOML)",
       RUN, "NAME=VALUE", repeat=True),
    _s("notify_template", _notify_template, None,
       "notifications: the body, a JSON document (or @FILE holding one) whose strings may"
       " hold {host} {message_id} {outcome} {detail} {time}", RUN, "JSON|@FILE"),
    _s("notify_timeout", _positive_duration, 10.0,
       "notifications: bound on one POST, answer included", RUN),
    # -- observability --
    _s("metrics_addr", _metrics_addr, None,
       "serve /metrics, /healthz, /readyz on HOST:PORT (off unless given)", RUN, "HOST:PORT"),
    _s("debug", boolean, False,
       "asyncio debug mode / trio step timing, slow steps from 20 ms, debug logs", RUN),
    _s("slow_callback_ms", _optional_ms, None,
       "report steps that block the event loop longer than this (0: off; default 100)",
       RUN, "MS"),
    _s("profile", optional_text, None, "write cProfile stats to FILE when the daemon stops",
       RUN, "FILE"),
)

BY_NAME = {s.name: s for s in SETTINGS}


def settings_for(command: str) -> list[Setting]:
    return [s for s in SETTINGS if command in s.commands]


def load(
    command: str,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> dict[str, Any]:
    """Merge the sources for ``command``; raises :class:`ConfigError` (one line) on any
    invalid value, unknown TOML key or unreadable file."""
    environ = os.environ if environ is None else environ
    file_values = _read_toml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for setting in settings_for(command):
        if flags.get(setting.name) is not None:
            raw, origin = flags[setting.name], setting.flag
        elif environ.get(setting.env, "") != "":
            raw, origin = environ[setting.env], setting.env
        elif setting.name in file_values:
            raw, origin = file_values[setting.name], f"{config_file}: {setting.name}"
        else:
            values[setting.name] = setting.default
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    return values


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # Accept both a flat file and a [mandrill] table.
    table = data.get("mandrill", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [mandrill] must be a table")
    normalised = {key.replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(normalised) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s): {', '.join(unknown)}")
    return normalised
