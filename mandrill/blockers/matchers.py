"""What the alerts blocker asks and which alerts count, as pure parsing: the API a URL
names (Prometheus or Alertmanager) and ``--block-alert-filter``'s label matchers.

A filter is Prometheus's own selector syntax, which operators already write in alert rules
and in Alertmanager's silences: label matchers separated by commas, optionally inside
braces, each ``label OP "value"`` with ``OP`` one of ``=``, ``!=``, ``=~``, ``!~``::

    alertname=~"Node.*",severity="critical"
    {severity!="info", instance=~"{hostname}(:[0-9]+)?"}

An alert matches when every matcher does (an absent label is the empty string, as in
Prometheus). Regular expressions are anchored at both ends, as in Prometheus, and use
Python's syntax (RE2's, for what filters need). A value may be left unquoted when it is a
plain word (``severity=critical``). ``{hostname}`` and ``{instance_name}`` in a value stand
for the host about to be restarted (escaped inside a regular expression), so that an alert
can block only its own host. An empty filter matches every alert.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit, urlunsplit

#: What ``{hostname}`` and ``{instance_name}`` become in a matcher's value.
PLACEHOLDERS = ("{hostname}", "{instance_name}")
#: Filled in for the placeholders when a filter is checked at start-up.
_SAMPLE_VALUES = {"{hostname}": "host-1.example.internal", "{instance_name}": "host-1"}

_LABEL = r"[A-Za-z_][A-Za-z0-9_]*"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_BARE = r"[^\s,{}\"=!~]+"
_MATCHER = re.compile(
    rf"\s*(?P<label>{_LABEL})\s*(?P<op>=~|!~|!=|=)\s*(?P<value>{_QUOTED}|{_BARE})\s*"
)
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}


class AlertsKind(StrEnum):
    """Whose alerts API a URL names; the value is its path."""

    PROMETHEUS = "/api/v1/alerts"
    ALERTMANAGER = "/api/v2/alerts"


@dataclass(frozen=True)
class AlertsApi:
    """Where the alerts are: the full URL to GET, and whose API it is."""

    kind: AlertsKind
    url: str

    @property
    def shown(self) -> str:
        """The URL without credentials, for logs and reasons."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_alerts_url(value: str) -> AlertsApi:
    """``http://prometheus:9090/api/v1/alerts`` (Prometheus),
    ``http://alertmanager:9093/api/v2/alerts`` (Alertmanager), or a base URL whose scheme
    says which: ``prometheus+http://prometheus:9090``, ``alertmanager+https://am.example``.
    Raises ``ValueError`` with a one-line reason."""
    text = value.strip()
    parts = urlsplit(text)
    scheme, kind = parts.scheme, None
    for named in AlertsKind:
        prefix = f"{named.name.lower()}+"
        if scheme.startswith(prefix):
            scheme, kind = scheme.removeprefix(prefix), named
    if scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ValueError(
            f"{value!r} is not an http(s) URL such as http://prometheus:9090/api/v1/alerts"
        )
    path = parts.path.rstrip("/")
    if kind is None:
        kind = next((named for named in AlertsKind if path.endswith(named.value)), None)
        if kind is None:
            raise ValueError(
                f"{value!r}: say whose alerts: end the URL with /api/v1/alerts (Prometheus) or"
                " /api/v2/alerts (Alertmanager), or write prometheus+http://… or"
                " alertmanager+http://…"
            )
    elif not path.endswith(kind.value):
        path += kind.value
    return AlertsApi(kind, urlunsplit((scheme, parts.netloc, path, parts.query, "")))


class Op(StrEnum):
    EQUAL = "="
    NOT_EQUAL = "!="
    MATCHES = "=~"
    NOT_MATCHES = "!~"


@dataclass(frozen=True)
class Matcher:
    """One ``label OP "value"``."""

    label: str
    op: Op
    value: str

    @property
    def is_regex(self) -> bool:
        return self.op in (Op.MATCHES, Op.NOT_MATCHES)

    def for_host(self, hosts: Mapping[str, str]) -> str | re.Pattern[str]:
        """The value with the placeholders filled in (a compiled, anchored pattern for a
        regular expression)."""
        value = self.value
        for placeholder, filler in hosts.items():
            value = value.replace(placeholder, re.escape(filler) if self.is_regex else filler)
        return re.compile(value) if self.is_regex else value

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{self.label}{self.op}"{escaped}"'


@dataclass(frozen=True)
class AlertFilter:
    """Label matchers that an alert must all satisfy (none: every alert)."""

    matchers: tuple[Matcher, ...] = ()

    def for_host(self, hostname: str, instance_name: str) -> HostFilter:
        """This filter with ``{hostname}`` and ``{instance_name}`` filled in."""
        hosts = {"{hostname}": hostname, "{instance_name}": instance_name}
        return HostFilter(tuple(
            (matcher.label, matcher.op, matcher.for_host(hosts)) for matcher in self.matchers
        ))

    def __str__(self) -> str:
        return ",".join(str(matcher) for matcher in self.matchers)


@dataclass(frozen=True)
class HostFilter:
    """An :class:`AlertFilter` filled in for one host, ready to match alerts' labels."""

    matchers: tuple[tuple[str, Op, str | re.Pattern[str]], ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        for label, op, value in self.matchers:
            have = labels.get(label, "")
            if op is Op.EQUAL:
                ok = have == value
            elif op is Op.NOT_EQUAL:
                ok = have != value
            else:
                assert isinstance(value, re.Pattern)
                ok = (value.fullmatch(have) is not None) == (op is Op.MATCHES)
            if not ok:
                return False
        return True


def parse_filter(text: str) -> AlertFilter:
    """Parse ``--block-alert-filter`` (see the module docstring); raises ``ValueError`` with
    a one-line reason, naming the part it could not read."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    matchers: list[Matcher] = []
    position = 0
    while body[position:].strip():
        found = _MATCHER.match(body, position)
        if found is None:
            rest = body[position:].strip()
            raise ValueError(
                f"cannot read {rest[:40]!r} in {text!r}: write label matchers such as"
                ' alertname=~"Node.*",severity="critical"'
            )
        matchers.append(_matcher(found["label"], Op(found["op"]), found["value"], text))
        position = found.end()
        if position < len(body):
            if body[position] != ",":
                raise ValueError(f"expected ',' after {found.group().strip()!r} in {text!r}")
            position += 1
    return AlertFilter(tuple(matchers))


def _matcher(label: str, op: Op, raw: str, text: str) -> Matcher:
    value = _unquote(raw, text) if raw.startswith('"') else raw
    matcher = Matcher(label, op, value)
    if matcher.is_regex:
        try:
            matcher.for_host(_SAMPLE_VALUES)
        except re.error as exc:
            raise ValueError(f"{matcher}: not a regular expression: {exc}") from None
    return matcher


def _unquote(raw: str, text: str) -> str:
    out: list[str] = []
    chars = iter(raw[1:-1])
    for char in chars:
        if char == "\\":
            escaped = next(chars)  # the pattern guarantees a character after "\"
            if escaped not in _ESCAPES:
                raise ValueError(f"unknown escape \\{escaped} in {raw} in {text!r}")
            out.append(_ESCAPES[escaped])
        else:
            out.append(char)
    return "".join(out)
