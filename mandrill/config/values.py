"""The parsers of setting values: each turns a flag's, a variable's or a TOML value into
the setting's type, or raises ``ValueError`` with a one-line reason; and :func:`show`, the
way back to text (``--help``'s defaults, the sample TOML)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit

from mandrill import safety
from mandrill.errors import ConfigError
from mandrill.grouping import GroupBy, parse_group_by
from mandrill.message import validate_domain
from mandrill.notification import BodyTemplate, parse_headers
from mandrill.obs.address import parse_addr

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


#: What a limit that never runs out is written as (``--source-outage-limit forever``).
FOREVER = "forever"


def limit_or_forever(value: object) -> float:
    """A duration > 0, or ``forever`` (``math.inf``): how long to outlast an outage."""
    if isinstance(value, str) and value.strip().lower() == FOREVER:
        return math.inf
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return math.inf
    try:
        seconds = duration(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a duration (examples: 30s, 10m, 1h) or 'forever'"
        ) from None
    if seconds <= 0:
        raise ValueError(f"{value!r} must be a duration > 0, or 'forever'")
    return seconds
#: What ``--help`` says of every duration: the units :func:`duration` accepts.
DURATION_UNITS = "units ms, s, m, h, d, w; a bare number is seconds"


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


def is_duration(parse: Callable[[object], Any]) -> bool:
    """Whether a setting parsed by ``parse`` is a duration (its help names the units, its
    default shows as ``7d``)."""
    return parse in (duration, positive_duration, optional_positive_duration, limit_or_forever)


def positive_int(value: object) -> int:
    number = _int(value)
    if number < 1:
        raise ValueError(f"{value!r} must be at least 1")
    return number


def optional_positive_int(value: object) -> int | None:
    return None if value in (None, "", "none") else positive_int(value)


def optional_count(value: object) -> int | None:
    """A whole number >= 0, or none (not given)."""
    if value in (None, "", "none"):
        return None
    number = _int(value)
    if number < 0:
        raise ValueError(f"{value!r} must be 0 or more")
    return number


def group_by(value: object) -> GroupBy | None:
    """``--group-by``: ``attribute:NAME`` or ``pattern:REGEX`` (see :mod:`mandrill.grouping`)."""
    if value in (None, ""):
        return None
    return parse_group_by(str(value))


def optional_positive_duration(value: object) -> float | None:
    return None if value in (None, "", "none") else positive_duration(value)


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


def patterns(value: object) -> tuple[str, ...]:
    return safety.parse_patterns(value if isinstance(value, list) else str(value))


def optional(parse: Callable[[str], Any]) -> Callable[[object], Any]:
    def parse_optional(value: object) -> Any:
        return None if value in (None, "") else parse(str(value))

    return parse_optional


def dates(value: object) -> frozenset[date]:
    """Blackout dates: ``2026-12-24,2026-12-31``, or a TOML list of them."""
    if value in (None, ""):
        return frozenset()
    return safety.parse_dates(value if isinstance(value, list) else str(value))


def dates_file(value: object) -> frozenset[date]:
    """The blackout dates a file holds (read now: a bad date stops the start, naming its
    line)."""
    path = optional_text(value)
    if path is None:
        return frozenset()
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file") from None
    return safety.parse_dates_text(text, path)


def zone(value: object) -> str:
    name = str(value).strip()
    safety.parse_timezone(name)
    return name


def http_addr(value: object) -> str | None:
    """``HOST:PORT`` to listen on (``--metrics-addr``, ``--status-addr``), or ``None``."""
    if value in (None, ""):
        return None
    parse_addr(str(value))
    return str(value).strip()


def new_file(value: object) -> str | None:
    """A file to write later: its directory must exist now, not when the work is done."""
    path = optional_text(value)
    if path is not None and not os.path.isdir(os.path.dirname(path) or "."):
        raise ValueError(f"{path!r}: directory {os.path.dirname(path)!r} does not exist")
    return path


def api_root(value: object) -> str | None:
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


def alerts_url(value: object) -> str | None:
    """``--block-on-alerts``: a URL naming Prometheus's or Alertmanager's alerts API."""
    if value in (None, ""):
        return None
    from mandrill.blockers.matchers import parse_alerts_url

    text = str(value).strip()
    parse_alerts_url(text)
    return text


def alert_filter(value: object) -> str | None:
    """``--block-alert-filter``: label matchers (``alertname=~"Node.*",severity="critical"``)."""
    if value in (None, ""):
        return None
    from mandrill.blockers.matchers import parse_filter

    text = str(value).strip()
    parse_filter(text)
    return text or None


def blocker_command(value: object) -> str | None:
    """``--block-on-command``: an argv template, as the command restarter's."""
    if value in (None, ""):
        return None
    from mandrill.restarters.command import ArgvTemplate

    text = str(value).strip()
    ArgvTemplate(text, "blocker command")
    return text


def notify_headers(value: object) -> tuple[tuple[str, str], ...]:
    return parse_headers(value, os.environ)


def notify_template(value: object) -> BodyTemplate | None:
    if value in (None, ""):
        return None
    return BodyTemplate.from_option(str(value))


def optional_ms(value: object) -> float | None:
    if value in (None, ""):
        return None
    number = _float(value)
    if number < 0:
        raise ValueError(f"{value!r} must be >= 0 milliseconds")
    return number


def show(value: Any, parse: Callable[[object], Any] | None = None) -> str | None:
    """A setting's value as a user would write it in a flag or a TOML file."""
    if value is None or value == () or value == frozenset() or value is False:
        return None
    if value is True:
        return "on"
    if parse is limit_or_forever:
        return FOREVER if math.isinf(value) else format_duration(float(value))
    if parse is not None and is_duration(parse):
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
