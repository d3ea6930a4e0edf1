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
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from mandrill import safety
from mandrill.errors import ConfigError
from mandrill.message import DEFAULT_DOMAIN, validate_domain
from mandrill.policy import Outcome

ENV_PREFIX = "MANDRILL_"

#: What ``history --outcome`` accepts: the ledger's restart outcomes and dead letters.
HISTORY_OUTCOMES = (*(outcome.value for outcome in Outcome), "dead_letter")

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


def parse_since(value: str | None, flag: str) -> float | None:
    """``--since 1d`` → the epoch time one day ago; raises :class:`ConfigError` naming
    ``flag``."""
    if value is None:
        return None
    try:
        return datetime.now(UTC).timestamp() - duration(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


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


class Choice:
    """A parser for one of a few words; ``--help`` shows them (``{asyncio,trio}``)."""

    def __init__(self, *options: str) -> None:
        self.options = options

    def __call__(self, value: object) -> str:
        text = str(value).strip().lower()
        if text not in self.options:
            raise ValueError(f"{value!r} is not one of {', '.join(self.options)}")
        return text


def choice(*options: str) -> Choice:
    return Choice(*options)


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
    from mandrill.obs.address import parse_addr

    if value in (None, ""):
        return None
    parse_addr(str(value))
    return str(value).strip()


def _new_file(value: object) -> str | None:
    """A file to write later: its directory must exist now, not when the work is done."""
    path = optional_text(value)
    if path is not None and not os.path.isdir(os.path.dirname(path) or "."):
        raise ValueError(f"{path!r}: directory {os.path.dirname(path)!r} does not exist")
    return path


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
    #: Where ``--help`` lists it (see :data:`GROUPS`).
    group: str = "general"
    #: A flag that may be given several times; the parser receives the list.
    repeat: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def is_boolean(self) -> bool:
        return self.switch or self.parse is boolean

    @property
    def shown_metavar(self) -> str:
        """``{asyncio,trio}`` for a choice, else the table's metavar or the value's kind."""
        if isinstance(self.parse, Choice):
            return "{" + ",".join(self.parse.options) + "}"
        if self.metavar is not None:
            return self.metavar
        kinds: dict[Callable[[object], Any], str] = {
            duration: "DURATION", positive_int: "N", optional_positive_int: "N",
            optional_int: "N", fraction: "FRACTION",
        }
        return kinds.get(self.parse, self.name.upper())

    @property
    def choices(self) -> tuple[str, ...]:
        return self.parse.options if isinstance(self.parse, Choice) else ()

    @property
    def shown_default(self) -> str | None:
        """The default as a user writes it (``7d``, ``on``), or ``None`` when there is
        none to show (unset, an empty list, a switch that is off)."""
        return show(self.default, self.parse)


def show(value: Any, parse: Callable[[object], Any] | None = None) -> str | None:
    """A setting's value as a user would write it in a flag or a TOML file."""
    if value is None or value == () or value is False:
        return None
    if value is True:
        return "on"
    if parse is duration:
        return format_duration(float(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_duration(seconds: float) -> str:
    """``604800`` → ``7d``, ``90`` → ``90s``, ``0.25`` → ``250ms``: the largest unit up to
    days that states it exactly, so the text parses back to the same value."""
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        count = seconds / _UNITS[unit]
        if count >= 1 and count.is_integer():
            return f"{int(count)}{unit}"
    milliseconds = f"{round(seconds * 1000)}ms"
    if duration(milliseconds) == seconds:
        return milliseconds
    # Enough digits to parse back to the same value ({:g}'s six would round 134217.727).
    return f"{seconds:.15g}s"


RUN = frozenset({"run"})
PUBSUB = frozenset({"run", "publish", "setup", "replay"})
#: Settings of the subscription: publish and replay only send to the topic.
SUBSCRIPTION = frozenset({"run", "setup"})
#: The topic: run pulls from the subscription and never publishes.
TOPIC = frozenset({"publish", "setup", "replay"})
LEDGER = frozenset({"run", "history", "replay"})
ALL = frozenset({"run", "publish", "setup", "history", "replay"})

#: The groups of ``--help``, in order; "general" is argparse's own list of options.
GROUPS = {
    "general": "options",
    "source": "source (where messages come from)",
    "ledger": "ledger (what was decided, shared by a fleet)",
    "restarter": "restarter (how hosts are restarted)",
    "safety": "safety (which restarts may go ahead)",
    "shutdown": "shutdown",
    "notifications": "notifications",
    "observability": "observability (logs, metrics, health, debugging)",
}


def _s(name: str, parse: Callable[[object], Any], default: Any, help: str,
       commands: frozenset[str], metavar: str | None = None, switch: bool = False,
       repeat: bool = False, *, group: str) -> Setting:
    return Setting(name, parse, default, help, commands, metavar, switch, group, repeat)


SETTINGS: tuple[Setting, ...] = (
    _s("backend", choice("asyncio", "trio"), "asyncio", "event loop to run on", ALL,
       group="general"),
    _s("max_in_flight", positive_int, 256, "messages held at once (backpressure)", RUN,
       group="general"),
    _s("count", optional_positive_int, None,
       "run: stop after N messages are done; publish: publish N messages",
       frozenset({"run", "publish"}), "N", group="general"),
    # -- source --
    _s("source", choice("memory", "pubsub"), "memory",
       "memory: the embedded in-process broker; pubsub: Google Cloud Pub/Sub",
       RUN, group="source"),
    _s("project", optional_text, None, "Google Cloud project (pubsub)", PUBSUB, group="source"),
    _s("subscription", text, "mandrill", "Pub/Sub subscription to pull from",
       SUBSCRIPTION, group="source"),
    _s("topic", text, "mandrill", "Pub/Sub topic to publish to", TOPIC, group="source"),
    _s("dead_letter_topic", optional_text, None,
       "topic receiving invalid and poison messages", SUBSCRIPTION, group="source"),
    _s("pubsub_api_root", _api_root, None,
       "Pub/Sub endpoint, e.g. a regional https://europe-west1-pubsub.googleapis.com"
       " (default: PUBSUB_EMULATOR_HOST's emulator, without credentials, else the global"
       " endpoint); always used with credentials", PUBSUB, "URL", group="source"),
    _s("ack_deadline", duration, 10.0,
       "run: the embedded broker's ack deadline; setup: the subscription's (10s to 600s)",
       frozenset({"run", "setup"}), group="source"),
    _s("max_delivery_attempts", positive_int, 10,
       "setup: deliveries after which Pub/Sub forwards a message to the dead-letter topic",
       frozenset({"setup"}), group="source"),
    _s("max_lease", duration, 3600.0, "longest a message is kept leased while worked on", RUN,
       group="source"),
    _s("publish", boolean, True, "embedded demo: run the talk's publisher in-process", RUN,
       group="source"),
    _s("rate", optional_rate, 20.0,
       "messages per second the publisher sends (0: as fast as possible)",
       frozenset({"run", "publish"}), "PER_SECOND", group="source"),
    _s("seed", optional_int, None, "random seed for the simulated parts", RUN | {"publish"},
       group="source"),
    # -- ledger --
    _s("ledger", text, "mandrill.db",
       "SQLite file (or :memory:), or postgresql://… for a fleet", LEDGER, "URL",
       group="ledger"),
    _s("ledger_outage_limit", duration, 60.0,
       "how long the ledger may be unreachable before the daemon stops", RUN, group="ledger"),
    _s("outcome_journal", text, "auto",
       "file keeping restart outcomes while the ledger is unreachable (auto: beside a"
       " SQLite ledger; $XDG_STATE_HOME/mandrill/ for PostgreSQL)", RUN, "PATH",
       group="ledger"),
    _s("instance_timeout", positive_duration, 30.0,
       "a daemon silent in the ledger this long is dead: its restart claims are resolved as"
       " 'unknown' by the others (it heartbeats 6 times as often)", RUN, group="ledger"),
    _s("retry_unknown", boolean, False,
       "restart again a host whose restart outcome is unknown (its daemon died mid-restart)"
       " instead of counting it as restarted", RUN, group="ledger"),
    # -- restarter --
    _s("restarter", choice("simulated", "command", "gce"), "simulated",
       "how hosts are restarted", RUN, group="restarter"),
    _s("domain", domain, DEFAULT_DOMAIN, "DNS domain appended to instance names", LEDGER,
       group="restarter"),
    _s("max_attempts", positive_int, 5,
       "failed restarts of one message before it is dead-lettered", RUN, group="restarter"),
    _s("restart_latency", duration, 0.5,
       "simulated restarter: restarts take up to this long", RUN, group="restarter"),
    _s("restart_failure_rate", fraction, 0.1,
       "simulated restarter: share of restarts that fail", RUN, group="restarter"),
    _s("restart_command", optional_text, None,
       "command restarter: argv template, e.g. 'ssh {hostname} sudo systemctl reboot'", RUN,
       group="restarter"),
    _s("restart_timeout", duration, 60.0, "command restarter: kill a restart after this", RUN,
       group="restarter"),
    _s("gce_project", optional_text, None, "gce restarter: project (else the message's)", RUN,
       group="restarter"),
    _s("gce_zone", optional_text, None, "gce restarter: zone (else the message's)", RUN,
       group="restarter"),
    _s("gce_api_root", text, "https://compute.googleapis.com/compute/v1",
       "gce restarter: Compute Engine API root", RUN, "URL", group="restarter"),
    # -- safety controls --
    _s("live", boolean, False,
       "really restart with a real restarter (command, gce); without it they dry-run", RUN,
       group="safety"),
    _s("dry_run", boolean, False, "decide and record, restart nothing (any restarter)", RUN,
       group="safety"),
    _s("min_restart_interval", duration, 7 * 86400.0,
       "do not restart a host restarted more recently than this", RUN, group="safety"),
    _s("exclude", _parse_patterns, (), "never restart hosts matching these globs (comma list)",
       RUN, "GLOBS", group="safety"),
    _s("only", _parse_patterns, (), "restart only hosts matching these globs (comma list)",
       RUN, "GLOBS", group="safety"),
    _s("weekdays", _optional(safety.parse_weekdays), None,
       "restart only on these days, e.g. mon-fri", RUN, "DAYS", group="safety"),
    _s("hours", _optional(safety.parse_hours), (),
       "restart only in these hours, e.g. 09:00-17:00", RUN, "HH:MM-HH:MM", group="safety"),
    _s("timezone", _zone, "UTC", "time zone of --weekdays and --hours", RUN, "ZONE",
       group="safety"),
    _s("max_concurrent_restarts", optional_positive_int, None,
       "restarts under way at once in this daemon", RUN, "N", group="safety"),
    _s("max_restarts", optional_positive_int, None,
       "fleet rate limit: restarts per --max-restarts-window across all daemons", RUN, "N",
       group="safety"),
    _s("max_restarts_window", duration, 3600.0, "fleet rate limit window", RUN,
       group="safety"),
    # -- shutdown --
    _s("grace", duration, 10.0, "time in-flight work gets to finish at shutdown", RUN,
       group="shutdown"),
    _s("settle_timeout", duration, 5.0,
       "bound on the final nack/ack flush at shutdown", RUN, group="shutdown"),
    # -- notifications --
    _s("notify_url", optional_text, None,
       "POST a JSON document for every restart and skip to this URL", RUN, "URL",
       group="notifications"),
    _s("notify_header", _notify_headers, (),
       "notifications: a request header; ${VAR} takes VAR from the environment (repeat the"
       " flag for more; one per line in the environment variable; a list in TOML)",
       RUN, "NAME=VALUE", repeat=True, group="notifications"),
    _s("notify_template", _notify_template, None,
       "notifications: the body, a JSON document (or @FILE holding one) whose strings may"
       " hold {host} {message_id} {outcome} {detail} {time}", RUN, "JSON|@FILE",
       group="notifications"),
    _s("notify_timeout", positive_duration, 10.0,
       "notifications: bound on one POST, answer included", RUN, group="notifications"),
    # -- observability --
    _s("log_format", choice("auto", "text", "json"), "auto",
       "log format; auto: text on a terminal, JSON otherwise", ALL, group="observability"),
    _s("log_level", choice("debug", "info", "warning", "error"), "info", "log level", ALL,
       group="observability"),
    _s("metrics_addr", _metrics_addr, None,
       "serve /metrics, /healthz, /readyz on HOST:PORT (off unless given)", RUN, "HOST:PORT",
       group="observability"),
    _s("debug", boolean, False,
       "asyncio debug mode / trio step timing, slow steps from 20 ms, debug logs", RUN,
       group="observability"),
    _s("slow_callback_ms", _optional_ms, None,
       "report steps that block the event loop longer than this (0: off; default 100)",
       RUN, "MS", group="observability"),
    _s("profile", _new_file, None, "write cProfile stats to FILE when the daemon stops",
       RUN, "FILE", group="observability"),
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
    invalid value (in the file, also of settings other commands use), unknown TOML key or
    unreadable file."""
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
    # The file is checked whole, whichever command reads it: a value `run` would refuse
    # shows up at `mandrill history --config`, not only at the daemon's next start.
    for name, raw in file_values.items():
        if name not in values:
            try:
                BY_NAME[name].parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{config_file}: {name}: {exc}") from None
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
