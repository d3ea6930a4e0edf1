"""``mandrill explain HOST`` and ``/explain?host=``: would a message for this host restart
it now, and if not, every rule that says no.

Each rule is one async function of a :class:`Situation` (the host as a message names it,
the time, the controls in force, what the ledger knows of the host) that returns a
:class:`Finding` when it says no and ``None`` when it does not; :data:`RULES` lists them in
the order the daemon applies them. They decide with the daemon's own code
(:func:`mandrill.safety.host_skip_reason`, :meth:`TimeWindow.skip_reason
<mandrill.safety.TimeWindow.skip_reason>`, :func:`mandrill.policy.decide_restart` over what
:func:`mandrill.ledger.fleet.host_facts` reads as a claim would), each rule applied alone,
so that every rule that says no is found, not only the first the daemon would record.

To add a rule (the restart-storm breaker, a blocker): write one such function, append it
to :data:`RULES` (or pass ``rules=``), and give it its settings through
:class:`~mandrill.controls.Controls`; a rule that needs more of the ledger reads it with
``await situation.ledger.read(fn)`` (``fn(cursor, dialect, now)``, as in
:mod:`mandrill.ledger.fleet`). Its :attr:`Finding.reason` is its own code.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from mandrill.blockers.base import Blockers
from mandrill.controls import Controls
from mandrill.errors import InvalidMessage
from mandrill.grouping import ATTRIBUTE
from mandrill.ledger.base import Ledger
from mandrill.ledger.fleet import HostFacts, host_facts
from mandrill.ledger.groups import UnderWay
from mandrill.ledger.schema import Dialect
from mandrill.message import Delivery, Message, encode_payload, parse_delivery
from mandrill.policy import (
    Decision,
    Prior,
    Reason,
    Rules,
    Verdict,
    decide_restart,
    format_duration,
)
from mandrill.safety import TimeWindow, host_skip_reason

#: How far ahead :func:`next_opening` looks for the time window to open.
WINDOW_HORIZON = timedelta(days=8)


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule's no: the rule, the reason code, the sentence, and when it stops saying
    no (``until``, epoch seconds, when known) or who holds what it waits for (``by``)."""

    rule: str
    #: A :class:`~mandrill.policy.Reason` value, or the code of a rule added later.
    reason: str
    detail: str
    until: float | None = None
    by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "reason": self.reason, "detail": self.detail,
                "until": _iso(self.until), "by": self.by}


@dataclass(frozen=True, slots=True)
class Situation:
    """What a rule judges: ``message`` names the host as a message would; ``now`` is the
    ledger's time (of the interval and the rate limit), ``wall_time`` this machine's (of
    the time window, as the daemon reads it)."""

    message: Message
    controls: Controls
    host: HostFacts
    now: float
    wall_time: datetime
    ledger: Ledger
    #: The blockers the daemon asks just before each restart (``None``: none).
    blockers: Blockers | None = None


Check = Callable[[Situation], Awaitable[Finding | None]]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    check: Check


async def exclusion(situation: Situation) -> Finding | None:
    """``--exclude`` and ``--only``."""
    safety = situation.controls.safety
    if safety is None:
        return None
    refusal = host_skip_reason(situation.message, safety.exclude, safety.only)
    if refusal is None:
        return None
    return Finding("exclusion", refusal.reason, refusal.detail)


async def window(situation: Situation) -> Finding | None:
    """``--weekdays`` and ``--hours``: closed now, and when it opens."""
    safety = situation.controls.safety
    if safety is None or safety.window is None:
        return None
    refusal = safety.window.skip_reason(situation.wall_time)
    if refusal is None:
        return None
    opens = next_opening(safety.window, situation.wall_time)
    detail = refusal.detail
    if opens is not None:
        left = (opens - situation.wall_time).total_seconds()
        local = opens.astimezone(safety.window.tz).isoformat(timespec="minutes")
        detail += f"; opens in {format_duration(left)} ({local})"
    return Finding("window", refusal.reason, detail,
                   until=None if opens is None else opens.timestamp())


async def under_way(situation: Situation) -> Finding | None:
    """A restart of the host under way, by a daemon that is alive (a dead one's claim is
    resolved as unknown by the next message: see :func:`interval`)."""
    timeout, now = situation.controls.instance_timeout, situation.now
    live = [row for row in situation.host.under_way if not row.orphaned(now, timeout)]
    if not live:
        return None
    claim = live[0]
    decision = decide_restart(Prior(host_busy_with=claim.message_id), now,
                              situation.controls.rules)
    if decision.verdict is not Verdict.BUSY:
        return None
    owner = claim.owner or "a daemon from before instance heartbeats"
    detail = (f"{decision.detail}: claimed {format_duration(max(0.0, now - claim.since))} ago"
              f" by {owner}; the message would wait for its outcome")
    return Finding("under_way", decision.reason or Reason.HOST_UNDER_WAY, detail, by=claim.owner)


async def interval(situation: Situation) -> Finding | None:
    """``--min-restart-interval``: the host's last counted restart, and the time left."""
    last = situation.host.last_restart
    if last is None:
        return None
    rules = situation.controls.rules
    alone = Rules(rules.min_interval, retry_unknown=rules.retry_unknown)
    decision = decide_restart(Prior(host_last_restart=last), situation.now, alone)
    if decision.reason is not Reason.INTERVAL:
        return None
    until = last + rules.min_interval
    left = format_duration(until - situation.now)
    return Finding("interval", Reason.INTERVAL,
                   f"{decision.detail}; eligible again in {left} ({_iso(until)})", until=until)


async def rate_limit(situation: Situation) -> Finding | None:
    """``--max-restarts`` per ``--max-restarts-window``, across the fleet."""
    limit, counted = situation.controls.rules.rate_limit, situation.host.fleet_restarts
    if limit is None or counted is None:
        return None
    decision = decide_restart(Prior(fleet_restarts=counted.count), situation.now,
                              Rules(0.0, limit))
    if decision.reason is not Reason.RATE_LIMIT:
        return None
    until = None if counted.oldest is None else counted.oldest + limit.window
    detail = decision.detail
    if until is not None:
        detail += f"; the oldest leaves the window in {format_duration(until - situation.now)}"
    return Finding("rate_limit", Reason.RATE_LIMIT, detail, until=until)


async def group_limit(situation: Situation) -> Finding | None:
    """``--max-concurrent-restarts-per-group``: the live claims in the host's group, across
    the fleet. Under ``--group-by attribute:NAME`` a message's attribute names its group,
    which a host name does not carry: judged as a message without it (the detail says so)."""
    limit, host = situation.controls.rules.groups, situation.host
    if limit is None or host.group is None:
        return None
    counted = UnderWay(limit, {host.group: host.group_under_way})
    decision = counted.hold(host.group, Decision(Verdict.RESTART))
    if decision.verdict is not Verdict.BUSY:
        return None
    detail = decision.detail
    if limit.by.kind == ATTRIBUTE:
        detail += f" (a message without attribute {limit.by.key!r}; one with it is in its group)"
    return Finding("group_limit", Reason.GROUP_LIMIT, detail)


async def breaker(situation: Situation) -> Finding | None:
    """The fleet's restart-storm breaker: open in the ledger, it holds back every daemon's
    restarts, whatever this one's settings."""
    found = await situation.ledger.breaker_status()
    if found is None or not found.is_open:
        return None
    return Finding("breaker", Reason.BREAKER_OPEN, found.held_detail(), by=found.opened_by)


async def blockers(situation: Situation) -> Finding | None:
    """``--block-on-alerts`` and ``--block-on-command``, asked now as the worker would just
    before the restart (a blocker that cannot tell says no)."""
    if not situation.blockers:
        return None
    blocks = await situation.blockers.every(situation.message)
    if not blocks:
        return None
    return Finding("blocker", Reason.BLOCKED, "; ".join(str(block) for block in blocks))


#: The rules, in the order the daemon applies them: the safety controls before the claim,
#: then the claim's own (the breaker, a restart under way, the interval, the fleet's rate
#: limit, the host's group's limit), then the blockers, asked just before a restart begins.
RULES: tuple[Rule, ...] = (
    Rule("exclusion", exclusion),
    Rule("window", window),
    Rule("breaker", breaker),
    Rule("under_way", under_way),
    Rule("interval", interval),
    Rule("rate_limit", rate_limit),
    Rule("group_limit", group_limit),
    Rule("blocker", blockers),
)


@dataclass(frozen=True, slots=True)
class Explanation:
    hostname: str
    now: float
    dry_run: bool
    checked: tuple[str, ...]
    findings: tuple[Finding, ...]

    @property
    def would_restart(self) -> bool:
        return not self.findings

    def verdict(self) -> str:
        if self.findings:
            count = len(self.findings)
            says = "1 rule says" if count == 1 else f"{count} rules say"
            return f"would NOT be restarted now: {says} no"
        if self.dry_run:
            return "would be restarted now, but this is a dry run: recorded as dry_run only"
        return "would be restarted now"

    def text(self) -> str:
        """What ``mandrill explain`` prints."""
        lines = [f"{self.hostname}: {self.verdict()}"]
        lines += [f"  {f.rule}: {f.detail} [{f.reason}]" for f in self.findings]
        lines.append(f"checked at {_iso(self.now)}: {', '.join(self.checked)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.hostname,
            "at": _iso(self.now),
            "would_restart": self.would_restart,
            "dry_run": self.dry_run,
            "verdict": self.verdict(),
            "findings": [finding.to_json() for finding in self.findings],
            "checked": list(self.checked),
        }


def host_message(text: str, domain: str) -> Message:
    """``HOST`` as a message would name it: an instance name (completed with ``domain``,
    as the daemon does) or its full hostname; validated as a message's host is. Raises
    ``ValueError`` with a one-line reason."""
    name = text.strip().rstrip(".")
    instance, dot, rest = name.partition(".")
    if dot and rest.lower() != domain:
        raise ValueError(
            f"{text!r} is not a host of --domain {domain}: messages name NAME.{domain}"
        )
    try:
        return parse_delivery(Delivery("", "explain", encode_payload(instance), {}, 0.0), domain)
    except InvalidMessage:
        raise ValueError(
            f"{text!r} is not an instance name or a hostname (an RFC 1123 label, or"
            f" LABEL.{domain})"
        ) from None


async def explain(
    ledger: Ledger,
    message: Message,
    controls: Controls,
    *,
    rules: Sequence[Rule] = RULES,
    wall_clock: Callable[[], float] = time.time,
    blockers: Blockers | None = None,
) -> Explanation:
    """Check ``message``'s host against every rule. Raises
    :class:`~mandrill.errors.LedgerError` when the ledger cannot be read."""
    now, facts = await ledger.read(partial(_facts, message, controls))
    situation = Situation(message, controls, facts, now,
                          datetime.fromtimestamp(wall_clock(), UTC), ledger, blockers)
    findings = [finding for rule in rules if (finding := await rule.check(situation))]
    return Explanation(message.hostname, now, controls.dry_run,
                       tuple(rule.name for rule in rules), tuple(findings))


def _facts(message: Message, controls: Controls, cur: Any, d: Dialect,
           now: float) -> tuple[float, HostFacts]:
    groups = controls.rules.groups
    group = None if groups is None else groups.by.group_of(message)
    return now, host_facts(cur, d, now, message.hostname, controls.rules,
                           controls.instance_timeout, group=group)


def next_opening(window: TimeWindow, after: datetime) -> datetime | None:
    """The first minute after ``after`` at which ``window`` lets restarts go ahead, within
    :data:`WINDOW_HORIZON` (``None`` if none: no day is allowed)."""
    minute = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    end = after + WINDOW_HORIZON
    while minute <= end:
        if window.skip_reason(minute) is None:
            return minute
        minute += timedelta(minutes=1)
    return None


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


__all__ = ["RULES", "Explanation", "Finding", "Rule", "Situation", "explain", "host_message"]
