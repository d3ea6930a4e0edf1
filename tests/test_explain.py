"""``explain``: every rule that says no, against a real ledger (SQLite and PostgreSQL), and
``mandrill explain`` as a process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mandrill.blockers.base import Blockers
from mandrill.controls import Controls
from mandrill.explain import RULES, Finding, Rule, Situation, explain, host_message
from mandrill.grouping import GroupLimit, parse_group_by
from mandrill.ledger import SQLLedger
from mandrill.ledger.base import Ledger
from mandrill.message import Message
from mandrill.policy import BreakerRule, Outcome, RateLimit, Rules
from mandrill.safety import SafetyControls, TimeWindow, parse_hours, parse_weekdays
from tests.ledger import HOUR, T0, WEEK, Clock, decide_one, finish, message, running
from tests.ledger.conftest import POSTGRES, url_for

#: T0 is 2027-01-15 08:00 UTC, a Friday.
FRIDAY_0800 = datetime.fromtimestamp(T0, UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite-memory", "sqlite-file", POSTGRES])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path,
                 clock: Clock) -> AsyncIterator[SQLLedger]:
    async with running(url_for(request.param, request, tmp_path), clock) as opened:
        yield opened


def controls(**options) -> Controls:
    options.setdefault("rules", Rules(WEEK))
    return Controls(**options)


async def why_not(ledger: Ledger, host: str, clock: Clock, **options) -> dict[str, Finding]:
    explanation = await explain(ledger, host_message(host, "example.net"), controls(**options),
                                wall_clock=clock)
    assert explanation.would_restart is not explanation.findings
    return {finding.rule: finding for finding in explanation.findings}


def test_the_clock_of_these_tests() -> None:
    assert (FRIDAY_0800.weekday(), FRIDAY_0800.hour) == (4, 8)


async def test_a_host_nothing_holds_back_would_be_restarted(ledger: SQLLedger,
                                                            clock: Clock) -> None:
    explanation = await explain(ledger, host_message("web-1", "example.net"), controls(),
                                wall_clock=clock)
    assert explanation.would_restart
    assert explanation.text().startswith("web-1.example.net: would be restarted now")
    assert explanation.checked == tuple(rule.name for rule in RULES)
    dry = await explain(ledger, host_message("web-1", "example.net"), controls(dry_run=True))
    assert "dry run" in dry.verdict()


async def test_interval_with_the_time_left(ledger: SQLLedger, clock: Clock) -> None:
    await finish(ledger, await decide_one(ledger, message("m1", "web-1")), Outcome.RESTARTED)
    clock.now = T0 + HOUR
    found = await why_not(ledger, "web-1.example.net", clock)
    assert set(found) == {"interval"}
    assert found["interval"].reason == "interval"
    assert found["interval"].until == T0 + WEEK
    assert "host restarted 1h ago; eligible again in 6d 23h" in found["interval"].detail
    clock.now = T0 + WEEK
    assert await why_not(ledger, "web-1", clock) == {}


async def test_an_unknown_outcome_counts_unless_retried(ledger: SQLLedger, clock: Clock) -> None:
    await finish(ledger, await decide_one(ledger, message("m1", "web-1")), Outcome.UNKNOWN)
    assert set(await why_not(ledger, "web-1", clock)) == {"interval"}
    retrying = Rules(WEEK, retry_unknown=True)
    assert await why_not(ledger, "web-1", clock, rules=retrying) == {}


async def test_a_restart_under_way_and_by_whom(ledger: SQLLedger, clock: Clock) -> None:
    claimed = await decide_one(ledger, message("m1", "web-1"))
    assert claimed.claim is not None
    clock.now = T0 + 5
    found = await why_not(ledger, "web-1", clock)
    assert set(found) == {"under_way"}
    assert found["under_way"].reason == "host_under_way"
    assert found["under_way"].by == ledger.instance.instance_id
    assert f"claimed 5s ago by {ledger.instance.instance_id}" in found["under_way"].detail


async def test_a_dead_daemons_claim_is_not_under_way_but_counts(
    tmp_path: Path, clock: Clock
) -> None:
    url = str(tmp_path / "ledger.db")
    async with running(url, clock) as gone:
        claimed = await decide_one(gone, message("m1", "web-1"))
        assert claimed.claim is not None
        gone.owned.settled([claimed.claim])  # as if killed: nothing resolves its claim
        async with running(url, clock) as alive:
            clock.now = T0 + 60
            found = await why_not(alive, "web-1", clock, instance_timeout=30)
    assert set(found) == {"interval"}
    assert found["interval"].until == T0 + WEEK


async def test_the_fleet_rate_limit(ledger: SQLLedger, clock: Clock) -> None:
    limit = Rules(WEEK, RateLimit(2, HOUR))
    for number in (1, 2):
        clock.now = T0 + number * 60
        claim = await decide_one(ledger, message(f"m{number}", f"web-{number}"), limit)
        await finish(ledger, claim, Outcome.RESTARTED)
    found = await why_not(ledger, "web-3", clock, rules=limit)
    assert set(found) == {"rate_limit"}
    assert found["rate_limit"].reason == "rate_limit"
    assert "2 restarts in the last 1h (limit 2)" in found["rate_limit"].detail
    assert found["rate_limit"].until == T0 + 60 + HOUR
    clock.now = T0 + 61 + HOUR
    assert await why_not(ledger, "web-3", clock, rules=limit) == {}


async def test_exclusion_and_only(ledger: SQLLedger, clock: Clock) -> None:
    excluded = SafetyControls(exclude=("web-*",))
    found = await why_not(ledger, "web-1", clock, safety=excluded)
    assert (found["exclusion"].reason, found["exclusion"].detail) == (
        "excluded", "host excluded by pattern 'web-*'"
    )
    only = SafetyControls(only=("db-*",))
    assert (await why_not(ledger, "web-1", clock, safety=only))["exclusion"].reason == (
        "not_allowed"
    )
    assert await why_not(ledger, "db-1", clock, safety=only) == {}


async def test_the_time_window_and_when_it_opens(ledger: SQLLedger, clock: Clock) -> None:
    hours = SafetyControls(window=TimeWindow(hours=parse_hours("09:30-17:00")))
    found = await why_not(ledger, "web-1", clock, safety=hours)
    assert found["window"].reason == "outside_hours"
    assert found["window"].until == T0 + 90 * 60
    assert "opens in 1h 30m" in found["window"].detail
    days = SafetyControls(window=TimeWindow(weekdays=parse_weekdays("mon-thu")))
    found = await why_not(ledger, "web-1", clock, safety=days)
    assert found["window"].reason == "outside_days"
    monday = datetime(2027, 1, 18, tzinfo=UTC).timestamp()
    assert found["window"].until == monday
    never = SafetyControls(window=TimeWindow(weekdays=frozenset(), hours=()))
    assert (await why_not(ledger, "web-1", clock, safety=never))["window"].until is None


async def test_every_rule_that_says_no_is_listed(ledger: SQLLedger, clock: Clock) -> None:
    limit = Rules(WEEK, RateLimit(1, HOUR))
    await finish(ledger, await decide_one(ledger, message("m1", "web-1"), limit),
                 Outcome.RESTARTED)
    clock.now = T0 + 60
    await decide_one(ledger, message("m2", "web-1"), Rules(0.0))  # under way, interval 0
    safety = SafetyControls(exclude=("web-*",),
                            window=TimeWindow(hours=parse_hours("00:00-01:00")))
    explanation = await explain(ledger, host_message("web-1", "example.net"),
                                controls(rules=limit, safety=safety), wall_clock=clock)
    assert [f.rule for f in explanation.findings] == [
        "exclusion", "window", "under_way", "interval", "rate_limit"
    ]
    assert explanation.text().splitlines()[0] == (
        "web-1.example.net: would NOT be restarted now: 5 rules say no"
    )
    data = explanation.to_json()
    assert data["would_restart"] is False
    assert [f["reason"] for f in data["findings"]] == [
        "excluded", "outside_hours", "host_under_way", "interval", "rate_limit"
    ]


async def test_a_rule_added_later_is_one_function(ledger: SQLLedger, clock: Clock) -> None:
    """How the breaker or a blocker joins: a function of the situation, in the rules."""

    async def breaker(situation: Situation) -> Finding | None:
        def count(cur, d, now) -> int:
            cur.execute("SELECT COUNT(*) FROM restarts")
            return int(cur.fetchone()[0])

        rows = await situation.ledger.read(count)
        return Finding("breaker", "breaker_open", f"open ({rows} rows)")

    explanation = await explain(ledger, host_message("web-1", "example.net"), controls(),
                                rules=(*RULES, Rule("breaker", breaker)), wall_clock=clock)
    assert [(f.rule, f.reason) for f in explanation.findings] == [("breaker", "breaker_open")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("web-1", "web-1.example.net"),
        ("WEB-1", "web-1.example.net"),
        ("web-1.example.net", "web-1.example.net"),
        ("web-1.example.net.", "web-1.example.net"),
    ],
)
def test_a_host_is_named_as_messages_name_it(text: str, expected: str) -> None:
    named = host_message(text, "example.net")
    assert isinstance(named, Message)
    assert named.hostname == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "is not an instance name or a hostname"),
        ("web_1", "is not an instance name or a hostname"),
        ("-web", "is not an instance name or a hostname"),
        ("a" * 64, "is not an instance name or a hostname"),
        ("web-1.other.org", "is not a host of --domain example.net"),
        ("<script>", "is not an instance name or a hostname"),
    ],
)
def test_a_bad_host_is_one_line(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as raised:
        host_message(text, "example.net")
    assert "\n" not in str(raised.value)


# --- mandrill explain, as a process --------------------------------------------------------


@pytest.mark.slow
async def test_explain_command_text_and_json(tmp_path: Path, backend_name: str) -> None:
    from tests.support.daemon import run_to_end

    ledger = str(tmp_path / "l.db")
    code, _, err = await run_to_end([
        "run", "--backend", backend_name, "--ledger", ledger, "--count", "5", "--rate", "0",
        "--restart-latency", "0s", "--restart-failure-rate", "0", "--seed", "7",
    ])
    assert code == 0, err
    code, out, _ = await run_to_end(["history", "--ledger", ledger, "--limit", "1"])
    host = out.splitlines()[1].split("\t")[1]
    common = ["explain", "--backend", backend_name, "--ledger", ledger]
    config = tmp_path / "mandrill.toml"
    config.write_text('exclude = ["cattle-*"]\nmax_restarts = 5\n')
    code, out, err = await run_to_end([*common, "--config", str(config), host])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{host}: would NOT be restarted now: 3 rules say no"
    assert lines[1].startswith("  exclusion: host excluded by pattern 'cattle-*' [excluded]")
    assert lines[2].startswith("  interval: host restarted ")
    assert lines[3].startswith("  rate_limit: fleet rate limit: 5 restarts in the last 1h")
    code, out, _ = await run_to_end([*common, "--json", "cattle-zzzz"])
    assert code == 0
    assert json.loads(out)["would_restart"] is True


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "mandrill: error: explain needs a HOST: an instance name or a hostname\n"),
        (["web_1"], "mandrill: error: HOST: 'web_1' is not an instance name or a hostname"),
        (["--hours", "25:00-26:00", "web-1"], "mandrill: error: --hours: time '25:00'"),
        (["--ledger", "/nonexistent/l.db", "web-1"], "mandrill: error: --ledger: no ledger at"),
    ],
)
async def test_explain_command_bad_input_exits_2(tmp_path: Path, args: list[str],
                                                 expected: str) -> None:
    from tests.support.daemon import run_to_end

    (tmp_path / "l.db").touch()
    code, out, err = await run_to_end(["explain", "--ledger", str(tmp_path / "l.db"), *args])
    assert (code, out) == (2, "")
    assert err.startswith(expected)


async def test_an_open_breaker_says_no_and_who_opened_it(ledger: SQLLedger,
                                                         clock: Clock) -> None:
    rules = Rules(WEEK, breaker=BreakerRule(0, None, HOUR))  # the first failure trips it
    failed = await decide_one(ledger, message("m1", "db-1"), rules)
    await finish(ledger, failed, Outcome.FAILED)
    assert (await decide_one(ledger, message("m2", "db-2"), rules)).claim is None  # opens it
    found = await why_not(ledger, "web-1", clock)  # whatever this daemon's own settings
    assert found["breaker"].reason == "breaker_open"
    assert "mandrill resume" in found["breaker"].detail
    assert found["breaker"].by == ledger.instance.instance_id
    await ledger.resume("operator")
    assert "breaker" not in await why_not(ledger, "web-1", clock)


class Saying:
    """A blocker that says ``reason`` (or nothing), as a real one does."""

    def __init__(self, name: str, reason: str | None) -> None:
        self.name, self.reason = name, reason

    async def check(self, message: Message) -> str | None:
        return self.reason


async def test_every_blocker_that_says_no_is_named(ledger: SQLLedger, clock: Clock) -> None:
    explanation = await explain(
        ledger, host_message("web-1", "example.net"), controls(), wall_clock=clock,
        blockers=Blockers([Saying("alerts", "NodeDown firing"), Saying("command", None),
                           Saying("script", "exit 1")]),
    )
    (finding,) = explanation.findings
    assert (finding.rule, finding.reason) == ("blocker", "blocked")
    assert finding.detail == "alerts: NodeDown firing; script: exit 1"
    quiet = await explain(ledger, host_message("web-1", "example.net"), controls(),
                          wall_clock=clock, blockers=Blockers([Saying("command", None)]))
    assert quiet.would_restart


async def test_a_group_at_its_limit_says_no(ledger: SQLLedger, clock: Clock) -> None:
    """``--max-concurrent-restarts-per-group``, by host name: the live claims in the host's
    group count, another group's do not, nor a claim whose daemon is gone."""
    by_zone = GroupLimit(parse_group_by(r"pattern:^[^-]+-([a-z])\d"), 2)
    rules = Rules(WEEK, groups=by_zone)
    for message_id, host in (("m1", "web-a1"), ("m2", "web-a2"), ("m3", "web-b1")):
        assert (await decide_one(ledger, message(message_id, host), rules)).claim is not None
    found = await why_not(ledger, "web-a3", clock, rules=rules)
    assert set(found) == {"group_limit"}
    assert found["group_limit"].reason == "group_limit"
    assert found["group_limit"].detail == (
        "group 'a' at its limit: 2 restarts under way (limit 2 per group)"
    )
    assert await why_not(ledger, "web-b2", clock, rules=rules) == {}
    assert await why_not(ledger, "web-a3", clock) == {}  # no limit per group configured
    clock.now = T0 + HOUR  # this daemon silent for an hour: its claims are orphans
    assert "group_limit" not in await why_not(ledger, "web-a3", clock, rules=rules)


async def test_a_group_by_attribute_is_judged_as_a_message_without_it(
    ledger: SQLLedger, clock: Clock
) -> None:
    rules = Rules(WEEK, groups=GroupLimit(parse_group_by("attribute:zone"), 1))
    assert (await decide_one(ledger, message("m1", "web-1"), rules)).claim is not None
    found = await why_not(ledger, "web-2", clock, rules=rules)
    assert found["group_limit"].detail == (
        "the hosts of no group (by attribute:zone) at its limit: 1 restarts under way"
        " (limit 1 per group) (a message without attribute 'zone'; one with it is in its"
        " group)"
    )
