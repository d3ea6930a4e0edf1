"""Groups of hosts for ``--max-concurrent-restarts-per-group`` (pure, no I/O): which group a
message's host belongs to, from a message attribute or from its host name.

``--group-by`` takes one of two forms:

* ``attribute:NAME``: the value of the message's attribute ``NAME`` (``attribute:zone``);
* ``pattern:REGEX``: what the one capture group of ``REGEX`` matches in the host name,
  searched anywhere in it (anchor it with ``^`` or ``$`` as needed);
  ``pattern:^[^.]+\\.([^.]+)\\.`` takes the zone of ``web-1.us-east1-b.example.net``.

A message whose group cannot be told (no such attribute, or an empty one; a host name the
pattern does not match) belongs to the group ``""``: limited like any other, so that a host
nobody expected cannot escape the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mandrill.message import Message

ATTRIBUTE = "attribute"
PATTERN = "pattern"
#: Pub/Sub's own bound on an attribute's key.
MAX_ATTRIBUTE_KEY_BYTES = 256
#: The group of a message whose group cannot be told.
NO_GROUP = ""


@dataclass(frozen=True)
class GroupBy:
    """How a message's group is found (see the module's docstring)."""

    kind: str
    #: The attribute's name, or the pattern's source.
    key: str
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def group_of(self, message: Message) -> str:
        if self._regex is None:
            return message.attributes.get(self.key, NO_GROUP)
        match = self._regex.search(message.hostname)
        return NO_GROUP if match is None else match.group(1) or NO_GROUP

    def __str__(self) -> str:
        """As written in ``--group-by`` (parses back to the same)."""
        return f"{self.kind}:{self.key}"


def parse_group_by(spec: str) -> GroupBy:
    """``attribute:NAME`` or ``pattern:REGEX`` (one capture group); raises ``ValueError``
    with a one-line reason."""
    kind, colon, key = spec.strip().partition(":")
    if not colon or kind not in (ATTRIBUTE, PATTERN):
        raise ValueError(f"{spec!r} is not attribute:NAME or pattern:REGEX")
    if kind == ATTRIBUTE:
        if not key or any(char.isspace() for char in key):
            raise ValueError(f"{spec!r}: an attribute name, without spaces, must follow"
                             " 'attribute:'")
        if len(key.encode()) > MAX_ATTRIBUTE_KEY_BYTES:
            raise ValueError(f"attribute name is over {MAX_ATTRIBUTE_KEY_BYTES} bytes")
        return GroupBy(ATTRIBUTE, key)
    try:
        regex = re.compile(key)
    except re.error as exc:
        raise ValueError(f"pattern {key!r} is not a regular expression: {exc}") from None
    if regex.groups != 1:
        raise ValueError(
            f"pattern {key!r} has {regex.groups} capture groups: it needs exactly one, the"
            " group's name (e.g. pattern:^[^.]+\\.([^.]+)\\.)"
        )
    return GroupBy(PATTERN, key, regex)


@dataclass(frozen=True, slots=True)
class GroupLimit:
    """At most ``limit`` restarts under way at once in each group, across every daemon."""

    by: GroupBy
    limit: int

    def held_detail(self, group: str, under_way: int) -> str:
        """What a message this limit holds back says (its deferral's detail)."""
        name = f"group {group!r}" if group else f"the hosts of no group (by {self.by})"
        return (f"{name} at its limit: {under_way} restarts under way"
                f" (limit {self.limit} per group)")


__all__ = ["NO_GROUP", "GroupBy", "GroupLimit", "parse_group_by"]
