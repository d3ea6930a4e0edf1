"""Safety controls checked before any restart: which hosts, on which days and hours, and
never on the blackout dates.

Pure functions over plain data (h11-style): no I/O and no clock reads; callers pass the time
as an aware ``datetime``. The ``parse_*`` functions turn flag values into those data and
raise ``ValueError`` with a one-line message for a bad spec. A check returns ``None`` when
a restart may go ahead, else a :class:`~mandrill.policy.Refusal`: the reason's code and
the sentence to record with the skip.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mandrill.message import Message
from mandrill.policy import Reason, Refusal

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MINUTES_PER_DAY = 24 * 60
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})$")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# --- hosts -------------------------------------------------------------------------------


def parse_patterns(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Host globs from ``"web-*,db-?"`` or from a list of such strings (a flag given twice).

    Patterns are fnmatch globs (``*``, ``?``, ``[seq]``), matched case-insensitively against
    a message's hostname and its instance name. Raises ``ValueError`` for an empty pattern.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    patterns: list[str] = []
    for item in items:
        for raw in item.split(","):
            pattern = raw.strip().lower()
            if not pattern:
                raise ValueError(f"empty host pattern in {item!r}")
            if any(char.isspace() for char in pattern):
                raise ValueError(f"host pattern {raw.strip()!r} contains whitespace")
            patterns.append(pattern)
    return tuple(patterns)


def matching_pattern(patterns: Iterable[str], message: Message) -> str | None:
    """The first of ``patterns`` that matches the message's hostname or instance name."""
    names = (message.hostname.lower(), message.instance_name.lower())
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(name, pattern.lower()) for name in names):
            return pattern
    return None


def host_skip_reason(
    message: Message, exclude: Iterable[str] = (), only: Iterable[str] = ()
) -> Refusal | None:
    """Why the host may not be restarted: excluded (which wins), or not among ``only``."""
    excluded_by = matching_pattern(exclude, message)
    if excluded_by is not None:
        return Refusal(Reason.EXCLUDED, f"host excluded by pattern {excluded_by!r}")
    only = tuple(only)
    if only and matching_pattern(only, message) is None:
        return Refusal(
            Reason.NOT_ALLOWED, f"host matches none of the allowed patterns ({', '.join(only)})"
        )
    return None


# --- time windows ------------------------------------------------------------------------


def parse_weekdays(spec: str) -> frozenset[int]:
    """Weekdays (0 = Monday) from ``"mon-fri"``, ``"mon,wed"``, ``"sat-mon"`` (wraps), …

    Names are three-letter or full English names, case-insensitive. Raises ``ValueError``.
    """
    days: set[int] = set()
    for raw in spec.split(","):
        item = raw.strip().lower()
        if not item:
            raise ValueError(f"empty weekday in {spec!r}")
        first, dash, last = item.partition("-")
        start = _weekday(first.strip(), spec)
        end = _weekday(last.strip(), spec) if dash else start
        days.update((start + offset) % 7 for offset in range((end - start) % 7 + 1))
    return frozenset(days)


def _weekday(name: str, spec: str) -> int:
    for names in (WEEKDAYS, _FULL_WEEKDAYS):
        if name in names:
            return names.index(name)
    raise ValueError(f"unknown weekday {name!r} in {spec!r}; use mon, tue, … sun")


def format_weekdays(days: Iterable[int]) -> str:
    """``"mon,wed,fri"``: the days in week order."""
    return ",".join(WEEKDAYS[day] for day in sorted(days))


@dataclass(frozen=True, slots=True)
class HoursWindow:
    """``[start, end)`` in minutes since midnight; ``start > end`` wraps past midnight."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < _MINUTES_PER_DAY and 0 <= self.end <= _MINUTES_PER_DAY):
            raise ValueError(f"hours window {self.start}-{self.end} is out of range")
        if self.start == self.end:
            raise ValueError(f"hours window {self} is empty; omit it to allow all day")

    def __contains__(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{_clock(self.start)}-{_clock(self.end)}"


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def parse_hours(spec: str) -> tuple[HoursWindow, ...]:
    """Hour windows from ``"09:00-17:00"`` or ``"22:00-06:00,12:00-13:00"``.

    A window includes its start and excludes its end; ``24:00`` may end one, and a window
    whose end is earlier than its start wraps past midnight. Raises ``ValueError`` for a bad
    time or an empty window (start equal to end).
    """
    windows = []
    for raw in spec.split(","):
        item = raw.strip()
        start, dash, end = item.partition("-")
        if not dash:
            raise ValueError(f"hours window {item!r} in {spec!r} is not HH:MM-HH:MM")
        start_minute = _minute(start.strip(), spec, end_of_day=False)
        end_minute = _minute(end.strip(), spec, end_of_day=True)
        windows.append(HoursWindow(start_minute, end_minute))
    return tuple(windows)


def _minute(text: str, spec: str, *, end_of_day: bool) -> int:
    match = _CLOCK.match(text)
    if match is None:
        raise ValueError(f"time {text!r} in {spec!r} is not HH:MM")
    hours, minutes = int(match[1]), int(match[2])
    if end_of_day and (hours, minutes) == (24, 0):
        return _MINUTES_PER_DAY
    if hours > 23 or minutes > 59:
        raise ValueError(f"time {text!r} in {spec!r} is not a time of day")
    return hours * 60 + minutes


def parse_timezone(name: str) -> tzinfo:
    """The IANA zone ``name`` (``"Europe/Paris"``, ``"UTC"``). Reads the zone database once;
    raises ``ValueError`` for an unknown name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


# --- blackout dates ----------------------------------------------------------------------


def parse_date(text: str) -> date:
    """``"2026-12-24"`` → that date; only ``YYYY-MM-DD`` (not the week or ordinal forms
    ``date.fromisoformat`` also takes). Raises ``ValueError`` naming the text."""
    item = text.strip()
    try:
        if _ISO_DATE.match(item):
            return date.fromisoformat(item)
    except ValueError:
        pass
    raise ValueError(f"{item!r} is not a date (YYYY-MM-DD)")


def parse_dates(spec: str | Iterable[str]) -> frozenset[date]:
    """Dates from ``"2026-12-24,2026-12-31"`` or a list of such strings (TOML). Raises
    ``ValueError`` naming the first bad date."""
    items = [spec] if isinstance(spec, str) else [str(item) for item in spec]
    dates: set[date] = set()
    for item in items:
        for raw in item.split(","):
            if not raw.strip():
                raise ValueError(f"empty date in {item!r}")
            dates.add(parse_date(raw))
    return frozenset(dates)


def parse_dates_text(text: str, name: str) -> frozenset[date]:
    """The dates of a file's ``text``: one ``YYYY-MM-DD`` per line; ``#`` starts a comment,
    blank lines are ignored. Raises ``ValueError`` naming the file (``name``) and the line."""
    dates: set[date] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        item = line.partition("#")[0].strip()
        if not item:
            continue
        try:
            dates.add(parse_date(item))
        except ValueError as exc:
            raise ValueError(f"{name} line {number}: {exc}") from None
    return frozenset(dates)


def format_dates(dates: Iterable[date]) -> str:
    return ",".join(day.isoformat() for day in sorted(dates))


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """When restarts are allowed: on ``weekdays`` (all if ``None``) during ``hours`` (all
    day if empty), never on ``skip_dates``, in the zone ``tz``.

    Like chaoskube, each check uses the weekday of the moment checked: with ``fri`` and
    ``22:00-06:00``, Saturday 01:00 is outside the window. A blackout date is the local
    day of the moment checked too: 2026-12-24 in Europe/Paris begins at 23:00 UTC the day
    before.
    """

    weekdays: frozenset[int] | None = None
    hours: tuple[HoursWindow, ...] = ()
    tz: tzinfo = field(default_factory=lambda: ZoneInfo("UTC"))
    skip_dates: frozenset[date] = frozenset()

    def skip_reason(self, now: datetime) -> Refusal | None:
        """Why ``now`` (aware) is outside the window; ``ValueError`` if ``now`` is naive."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("the time checked against a window must be timezone-aware")
        local = now.astimezone(self.tz)
        zone = str(self.tz)
        if local.date() in self.skip_dates:
            return Refusal(Reason.BLACKOUT_DATE,
                           f"blackout date: it is {local.date().isoformat()} ({zone})")
        if self.weekdays is not None and local.weekday() not in self.weekdays:
            allowed = format_weekdays(self.weekdays)
            return Refusal(
                Reason.OUTSIDE_DAYS,
                f"outside allowed days ({allowed} {zone}): it is {WEEKDAYS[local.weekday()]}",
            )
        minute = local.hour * 60 + local.minute
        if self.hours and not any(minute in window for window in self.hours):
            allowed = ",".join(map(str, self.hours))
            return Refusal(
                Reason.OUTSIDE_HOURS,
                f"outside allowed hours ({allowed} {zone}): it is {local:%H:%M}",
            )
        return None


# --- all together ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SafetyControls:
    """The host and time-window controls, as configured once at start-up.

    Dry runs and the fleet rate limit are not here: the worker applies them (the rate
    limit with the ledger's count, inside the claim's transaction; see
    :class:`mandrill.policy.RateLimit`).
    """

    exclude: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    window: TimeWindow | None = None

    def skip_reason(self, message: Message, now: datetime) -> Refusal | None:
        """Why this message's host must not be restarted at ``now`` (aware), or ``None``.

        Host patterns first, then the time window. Raises ``ValueError`` for a naive ``now``
        when a window is set.
        """
        reason = host_skip_reason(message, self.exclude, self.only)
        if reason is None and self.window is not None:
            reason = self.window.skip_reason(now)
        return reason
