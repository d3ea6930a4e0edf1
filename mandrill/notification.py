"""What a notification says, and the request headers it carries: pure, no I/O but reading
a template file, validated once at start.

A :class:`Notification` is one restart decision (``restarted``, ``failed``, ``skipped``,
``dry_run``, ``unknown``) or one dead letter (``dead_letter``). By default it is sent as
the JSON document ``{"host", "message_id", "outcome", "detail", "time"}``; a :class:`BodyTemplate`
reshapes it for a receiver that wants its own document (Slack's and Google Chat's incoming
webhooks take ``{"text": "…"}``). :func:`parse_header` turns ``NAME=VALUE`` into a request
header, taking secrets such as tokens from the environment (``${VAR}``), so that they stay
out of command lines and configuration files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mandrill.message import Message

if TYPE_CHECKING:
    from mandrill.ledger.base import DeadLetterRecord
    from mandrill.ledger.breaker import Breaker

#: The placeholders a body template may use, in the order the README lists them.
FIELDS = ("host", "message_id", "outcome", "detail", "time")
#: The outcome of the notification that says the restart-storm breaker opened.
BREAKER_OPEN = "breaker_open"
#: The outcome a dead letter's notification carries (as ``mandrill history`` names it).
DEAD_LETTER = "dead_letter"
#: A template file is a small document; anything larger is surely the wrong file.
MAX_TEMPLATE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Notification:
    """One decision about one message; ``time`` must be timezone-aware."""

    host: str
    message_id: str
    outcome: str
    detail: str
    time: datetime

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError("a notification's time must be timezone-aware")

    @classmethod
    def for_message(
        cls, message: Message, outcome: str, detail: str, time: datetime
    ) -> Notification:
        return cls(message.hostname, message.message_id, str(outcome), detail, time)

    @classmethod
    def for_breaker(cls, breaker: Breaker) -> Notification:
        """The fleet's restart-storm breaker opened: no host and no message, outcome
        ``breaker_open``, the reason as the detail."""
        detail = f"{breaker.why}; every restart waits for `mandrill resume`"
        return cls("", "", BREAKER_OPEN, detail, datetime.fromtimestamp(breaker.opened_at, UTC))

    @classmethod
    def for_dead_letter(cls, letter: DeadLetterRecord, time: datetime) -> Notification:
        """Outcome ``dead_letter``; the host is empty for a message too broken to name
        one (an invalid payload)."""
        host = letter.finish.claim.hostname if letter.finish is not None else ""
        return cls(host, letter.delivery.message_id, DEAD_LETTER, letter.detail, time)

    def fields(self) -> dict[str, str]:
        """The placeholders' values; time in ISO 8601 with its offset."""
        return {
            "host": self.host,
            "message_id": self.message_id,
            "outcome": self.outcome,
            "detail": self.detail,
            "time": self.time.isoformat(),
        }

    def to_json(self) -> bytes:
        """``{"host", "message_id", "outcome", "detail", "time"}``; time in ISO 8601."""
        return json.dumps(self.fields()).encode()


#: What a template is checked against at start (and what the README's examples show).
SAMPLE = Notification(
    "cattle-ab12.example.net",
    "1234567890",
    "restarted",
    'exit 0 "quoted" \\ \n',
    datetime(2026, 1, 5, 12, 0, 30, tzinfo=UTC),
)

# `{{` and `}}` stand for literal braces, as in str.format; `{name}` is a placeholder.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


class BodyTemplate:
    """A JSON document whose strings may hold ``{host}``, ``{message_id}``, ``{outcome}``,
    ``{detail}`` and ``{time}``.

    The template is parsed as JSON once and the placeholders are filled in its strings
    (keys included), so every value is JSON-escaped and every body is valid JSON whatever
    a host name or a detail holds. Raises ``ValueError`` (one line) for a template that is
    not JSON or names an unknown placeholder.
    """

    def __init__(self, source: str) -> None:
        try:
            self._document = json.loads(source)
        except json.JSONDecodeError as exc:
            hint = "" if source.lstrip()[:1] in "{[\"" else " (a file is given as @PATH)"
            raise ValueError(
                f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                " (placeholders go inside JSON strings)" + hint
            ) from None
        unknown = sorted(_unknown_placeholders(self._document))
        if unknown:
            names = ", ".join("{" + name + "}" for name in unknown)
            known = ", ".join("{" + name + "}" for name in FIELDS)
            raise ValueError(f"unknown placeholder(s) {names}; known: {known}")
        json.loads(self.render(SAMPLE))  # cannot fail by construction; cheap to be sure

    @classmethod
    def from_option(cls, value: str) -> BodyTemplate:
        """``@PATH`` reads the template from a file; anything else is the template."""
        if not value.startswith("@"):
            return cls(value)
        path = Path(value[1:])
        try:
            with path.open("rb") as file:
                raw = file.read(MAX_TEMPLATE_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"cannot read template file {path}: {exc.strerror}") from None
        if len(raw) > MAX_TEMPLATE_BYTES:
            raise ValueError(f"template file {path} is over {MAX_TEMPLATE_BYTES} bytes")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise ValueError(f"template file {path} is not UTF-8") from None
        try:
            return cls(text)
        except ValueError as exc:
            raise ValueError(f"template file {path}: {exc}") from None

    def render(self, notification: Notification) -> bytes:
        """The request body for ``notification``: UTF-8 JSON."""
        return json.dumps(_fill(self._document, notification.fields())).encode()


def _strings(document: Any) -> list[str]:
    if isinstance(document, str):
        return [document]
    if isinstance(document, list):
        return [text for item in document for text in _strings(item)]
    if isinstance(document, dict):
        return [text for key, value in document.items() for text in [key, *_strings(value)]]
    return []


def _unknown_placeholders(document: Any) -> set[str]:
    return {
        match.group(1)
        for text in _strings(document)
        for match in _PLACEHOLDER.finditer(text)
        if match.group(1) is not None and match.group(1) not in FIELDS
    }


def _fill(document: Any, values: Mapping[str, str]) -> Any:
    if isinstance(document, str):
        return _PLACEHOLDER.sub(
            lambda m: m.group()[0] if m.group(1) is None else values[m.group(1)], document
        )
    if isinstance(document, list):
        return [_fill(item, values) for item in document]
    if isinstance(document, dict):
        return {_fill(key, values): _fill(value, values) for key, value in document.items()}
    return document


# RFC 9110 token characters: what a header's name may be made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Headers the HTTP client owns: setting them would corrupt the request.
_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def parse_header(text: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """``NAME=VALUE`` → ``(NAME, VALUE)``, each ``${VAR}`` in VALUE replaced by the
    environment variable VAR.

    Raises ``ValueError`` (one line) for a malformed header, a reserved name, or a
    variable that is unset or empty. No message ever repeats a value: it may be a secret.
    """
    name, separator, template = text.partition("=")
    name = name.strip()
    if not separator:
        raise ValueError(
            "expected NAME=VALUE, e.g. 'Authorization=Bearer ${NOTIFY_TOKEN}'"
        )
    valid = _TOKEN.match(name)
    if valid is None or valid.end() != len(name):
        # Only the valid prefix is shown: what follows might be part of a token.
        prefix = name[: valid.end()] if valid else ""
        raise ValueError(
            f"header name {prefix!r}… has a character a header name cannot hold;"
            " expected NAME=VALUE"
        )
    if name.lower() in _RESERVED:
        raise ValueError(f"header {name} is set by the HTTP client and cannot be configured")
    value = _substitute(name, template.strip(), environ)
    if not value:
        raise ValueError(f"header {name} has an empty value")
    if any(not (" " <= char <= "~" or char == "\t") for char in value):
        raise ValueError(f"header {name}'s value holds a character other than printable ASCII")
    return name, value


def _substitute(name: str, template: str, environ: Mapping[str, str]) -> str:
    def lookup(match: re.Match[str]) -> str:
        variable = match.group(1)
        if not _ENV_NAME.fullmatch(variable):
            raise ValueError(f"header {name}: ${{{variable}}} is not an environment variable name")
        value = environ.get(variable, "")
        if not value:
            state = "empty" if variable in environ else "not set"
            raise ValueError(f"header {name}: environment variable {variable} is {state}")
        return value

    value = _REFERENCE.sub(lookup, template)
    if "${" in _REFERENCE.sub("", template):
        raise ValueError(f"header {name}: '${{' without a closing '}}'")
    return value


def parse_headers(value: object, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Several headers: a list (repeated flags, a TOML array) or one per line (an
    environment variable). Raises ``ValueError`` as :func:`parse_header` does, and for a
    header given twice."""
    items = value if isinstance(value, list | tuple) else str(value).splitlines()
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        if not str(item).strip():
            continue
        name, header_value = parse_header(str(item), environ)
        if name.lower() in seen:
            raise ValueError(f"header {name} is given twice")
        seen.add(name.lower())
        headers.append((name, header_value))
    return tuple(headers)


__all__ = [
    "FIELDS",
    "SAMPLE",
    "BodyTemplate",
    "Notification",
    "parse_header",
    "parse_headers",
]
