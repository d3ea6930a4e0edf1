from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mandrill.message import Message
from mandrill.policy import Reason, Refusal
from mandrill.safety import (
    WEEKDAYS,
    HoursWindow,
    SafetyControls,
    TimeWindow,
    host_skip_reason,
    parse_dates,
    parse_dates_text,
    parse_hours,
    parse_patterns,
    parse_timezone,
    parse_weekdays,
)

PARIS = ZoneInfo("Europe/Paris")
# 2026-01-05 is a Monday.
MONDAY_NOON_UTC = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def message(instance: str = "web-1", domain: str = "example.net") -> Message:
    return Message("m-1", instance, f"{instance.lower()}.{domain}", MONDAY_NOON_UTC, None)


# --- hosts ---


def test_parse_patterns():
    assert parse_patterns("web-*, DB-?") == ("web-*", "db-?")
    assert parse_patterns(["web-*", "db-1,db-2"]) == ("web-*", "db-1", "db-2")
    assert parse_patterns([]) == ()


@pytest.mark.parametrize("spec", ["", "web-*,", ",", "web *"])
def test_bad_patterns(spec):
    with pytest.raises(ValueError, match="pattern"):
        parse_patterns(spec)


def test_patterns_match_hostname_or_instance_name_case_insensitively():
    assert host_skip_reason(message("Web-1"), exclude=("WEB-*",)) is not None
    assert host_skip_reason(message("db-1"), exclude=("*.example.net",)) is not None
    assert host_skip_reason(message("db-1"), exclude=("db-[12]",)) is not None
    assert host_skip_reason(message("db-3"), exclude=("db-[12]",)) is None


def test_only_restricts_and_exclude_wins():
    assert host_skip_reason(message("web-1"), only=("web-*",)) is None
    reason = host_skip_reason(message("db-1"), only=("web-*", "cache-*"))
    assert reason == Refusal(
        Reason.NOT_ALLOWED, "host matches none of the allowed patterns (web-*, cache-*)"
    )
    reason = host_skip_reason(message("web-1"), exclude=("web-1",), only=("web-*",))
    assert reason == Refusal(Reason.EXCLUDED, "host excluded by pattern 'web-1'")


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(label, st.lists(label, max_size=3), st.lists(label, max_size=3))
def test_excluded_always_wins(instance, exclude, only):
    msg = message(instance)
    reason = host_skip_reason(msg, exclude=[*exclude, instance], only=[*only, instance])
    assert reason is not None
    assert reason.reason is Reason.EXCLUDED
    assert reason.detail.startswith("host excluded")


@given(label)
def test_no_patterns_allow_everything(instance):
    assert host_skip_reason(message(instance)) is None


# --- weekdays ---


@pytest.mark.parametrize(
    ("spec", "days"),
    [
        ("mon-fri", {0, 1, 2, 3, 4}),
        ("mon,wed", {0, 2}),
        ("Sat-Mon", {5, 6, 0}),
        ("sunday", {6}),
        ("mon-mon", {0}),
        (" tue - thu , sun ", {1, 2, 3, 6}),
    ],
)
def test_parse_weekdays(spec, days):
    assert parse_weekdays(spec) == days


@pytest.mark.parametrize("spec", ["", "mon,", "moon", "mon-", "mon-fri-sat", "1-5"])
def test_bad_weekdays(spec):
    with pytest.raises(ValueError, match="weekday") as caught:
        parse_weekdays(spec)
    assert "\n" not in str(caught.value)


day = st.integers(0, 6)


@given(day, day)
def test_weekday_ranges_walk_forward_and_wrap(start, end):
    days = parse_weekdays(f"{WEEKDAYS[start]}-{WEEKDAYS[end]}")
    expected, current = {start}, start
    while current != end:
        current = (current + 1) % 7
        expected.add(current)
    assert days == expected


@given(st.lists(day, min_size=1))
def test_weekday_lists_are_unions(days):
    assert parse_weekdays(",".join(WEEKDAYS[d] for d in days)) == set(days)


# --- hours ---


def test_parse_hours():
    assert parse_hours("09:00-17:30") == (HoursWindow(540, 1050),)
    assert parse_hours("22:00-06:00, 12:00-13:00") == (
        HoursWindow(1320, 360),
        HoursWindow(720, 780),
    )
    assert parse_hours("00:00-24:00") == (HoursWindow(0, 1440),)
    assert str(HoursWindow(1320, 360)) == "22:00-06:00"


@pytest.mark.parametrize(
    "spec", ["", "9-17", "09:00", "09:00-", "25:00-26:00", "09:60-10:00", "24:00-01:00", "9h-17h"]
)
def test_bad_hours(spec):
    with pytest.raises(ValueError, match=r"HH:MM|time of day") as caught:
        parse_hours(spec)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("spec", ["09:00-09:00", "00:00-00:00", "00:00-24:00,10:00-10:00"])
def test_empty_hours_window(spec):
    with pytest.raises(ValueError, match="empty"):
        parse_hours(spec)


minute = st.integers(0, 24 * 60 - 1)


@given(minute, minute, minute)
def test_hours_window_is_the_minutes_from_start_to_end(start, end, now):
    if start == end:
        return
    # Walk from start, one minute at a time, up to (not including) end, across midnight.
    inside, current = set(), start
    while current != end:
        inside.add(current)
        current = (current + 1) % (24 * 60)
    assert (now in HoursWindow(start, end)) == (now in inside)


@given(minute, minute)
def test_wrapping_window_is_the_complement_of_its_reverse(start, end):
    if start == end:
        return
    forward, backward = HoursWindow(start, end), HoursWindow(end, start)
    for now in {start, end, (start + 1) % 1440, (end - 1) % 1440, 0, 1439}:
        assert (now in forward) != (now in backward)


# --- time windows ---


def test_timezone():
    assert parse_timezone("Europe/Paris") == PARIS
    with pytest.raises(ValueError, match="unknown time zone"):
        parse_timezone("Mars/Olympus")
    with pytest.raises(ValueError, match="unknown time zone"):
        parse_timezone("../../etc/passwd")


def test_window_in_its_own_time_zone():
    window = TimeWindow(parse_weekdays("mon-fri"), parse_hours("09:00-17:00"), PARIS)
    # 12:00 UTC on Monday is 13:00 in Paris.
    assert window.skip_reason(MONDAY_NOON_UTC) is None
    # 16:30 UTC is 17:30 in Paris.
    reason = window.skip_reason(MONDAY_NOON_UTC + timedelta(hours=4, minutes=30))
    assert reason == Refusal(
        Reason.OUTSIDE_HOURS, "outside allowed hours (09:00-17:00 Europe/Paris): it is 17:30"
    )
    # Saturday.
    reason = window.skip_reason(MONDAY_NOON_UTC + timedelta(days=5))
    assert reason == Refusal(
        Reason.OUTSIDE_DAYS, "outside allowed days (mon,tue,wed,thu,fri Europe/Paris): it is sat"
    )


def test_window_wrapping_midnight_uses_the_day_of_the_moment():
    window = TimeWindow(parse_weekdays("fri"), parse_hours("22:00-06:00"), UTC)
    friday = datetime(2026, 1, 9, tzinfo=UTC)
    assert window.skip_reason(friday.replace(hour=23)) is None
    assert window.skip_reason(friday.replace(hour=1)) is None
    assert window.skip_reason(friday.replace(hour=6)) is not None
    assert window.skip_reason(friday.replace(hour=12)) is not None
    assert window.skip_reason(friday + timedelta(days=1, hours=1)) is not None


def test_window_across_a_dst_change():
    window = TimeWindow(None, parse_hours("02:00-03:00"), PARIS)
    # 2026-03-29: Paris jumps from 02:00 to 03:00; 01:30 UTC is 03:30 local.
    assert window.skip_reason(datetime(2026, 3, 29, 1, 30, tzinfo=UTC)) is not None
    # 2026-10-25: 02:00-03:00 happens twice, both are inside.
    assert window.skip_reason(datetime(2026, 10, 25, 0, 30, tzinfo=UTC)) is None
    assert window.skip_reason(datetime(2026, 10, 25, 1, 30, tzinfo=UTC)) is None


def test_naive_time_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        TimeWindow().skip_reason(datetime(2026, 1, 1))


@given(st.datetimes(timezones=st.just(UTC)))
def test_default_window_allows_everything(now):
    assert TimeWindow().skip_reason(now) is None


# --- the bundle ---


def test_safety_controls():
    controls = SafetyControls(
        exclude=("db-*",),
        only=("web-*", "db-*"),
        window=TimeWindow(parse_weekdays("mon-fri"), (), UTC),
    )
    assert controls.skip_reason(message("web-1"), MONDAY_NOON_UTC) is None
    excluded = controls.skip_reason(message("db-1"), MONDAY_NOON_UTC)
    assert excluded == Refusal(Reason.EXCLUDED, "host excluded by pattern 'db-*'")
    saturday = MONDAY_NOON_UTC + timedelta(days=5)
    outside = controls.skip_reason(message("web-1"), saturday)
    assert outside is not None
    assert outside.reason is Reason.OUTSIDE_DAYS


def test_default_controls_never_skip():
    controls = SafetyControls()
    assert controls.skip_reason(message(), MONDAY_NOON_UTC) is None


# --- blackout dates ---


CHRISTMAS_EVE = date(2026, 12, 24)


def test_a_blackout_date_is_the_local_day_of_its_zone():
    window = TimeWindow(tz=PARIS, skip_dates=frozenset({CHRISTMAS_EVE}))
    # 22:59 UTC on the 23rd is 23:59 in Paris: still the 23rd.
    assert window.skip_reason(datetime(2026, 12, 23, 22, 59, tzinfo=UTC)) is None
    # 23:00 UTC on the 23rd is midnight of the 24th in Paris.
    assert window.skip_reason(datetime(2026, 12, 23, 23, 0, tzinfo=UTC)) == Refusal(
        Reason.BLACKOUT_DATE, "blackout date: it is 2026-12-24 (Europe/Paris)"
    )
    assert window.skip_reason(datetime(2026, 12, 24, 22, 59, tzinfo=UTC)) is not None
    # 23:00 UTC on the 24th is the 25th in Paris, while it is still the 24th in UTC.
    assert window.skip_reason(datetime(2026, 12, 24, 23, 0, tzinfo=UTC)) is None
    in_utc = TimeWindow(skip_dates=frozenset({CHRISTMAS_EVE}))
    assert in_utc.skip_reason(datetime(2026, 12, 24, 23, 0, tzinfo=UTC)) is not None


def test_a_blackout_date_wins_over_an_open_window():
    window = TimeWindow(parse_weekdays("mon-fri"), parse_hours("09:00-17:00"), UTC,
                        frozenset({CHRISTMAS_EVE}))  # a Thursday
    noon = datetime(2026, 12, 24, 12, 0, tzinfo=UTC)
    refusal = window.skip_reason(noon)
    assert refusal is not None
    assert refusal.reason is Reason.BLACKOUT_DATE
    assert window.skip_reason(noon + timedelta(days=7)) is None


def test_dates_are_parsed_from_a_list():
    assert parse_dates("2026-12-24, 2026-12-31") == {CHRISTMAS_EVE, date(2026, 12, 31)}
    assert parse_dates(["2026-12-24", "2026-12-24"]) == {CHRISTMAS_EVE}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2026-12-24,2026-02-30", "'2026-02-30' is not a date (YYYY-MM-DD)"),
        ("24/12/2026", "'24/12/2026' is not a date (YYYY-MM-DD)"),
        ("2026-W52-4", "'2026-W52-4' is not a date"),
        ("20261224", "'20261224' is not a date"),
        ("2026-12-24,,2026-12-31", "empty date in"),
    ],
)
def test_a_bad_date_is_named(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_dates(spec)


def test_the_dates_of_a_file():
    text = "# company holidays\n2026-12-24\n\n  2026-12-31  # new year's eve\n#2027-01-01\n"
    assert parse_dates_text(text, "f") == {CHRISTMAS_EVE, date(2026, 12, 31)}
    with pytest.raises(ValueError, match=r"^f line 3: '2026-13-01' is not a date"):
        parse_dates_text("2026-12-24\n# x\n2026-13-01\n", "f")
