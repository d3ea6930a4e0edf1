"""Restart a host by running a command, e.g. ``ssh {hostname} sudo reboot``.

The command is an argv template, never a shell line: each element is formatted on its own
with ``{hostname}`` and ``{instance_name}``, so a value fills at most part of one argument
and is never split or interpreted. Values are validated again here (RFC 1123, no leading
``-``) even though the message parser already did: a hostname is the only input an
attacker controls, and this is where it reaches ``exec``.
"""

from __future__ import annotations

import shlex
import string
import subprocess
from collections.abc import Mapping, Sequence

import anyio

from mandrill.errors import RestartFailed
from mandrill.message import Message, is_valid_label, validate_domain

#: The names a template may use, as ``{name}``.
PLACEHOLDERS = frozenset({"hostname", "instance_name"})

#: How much of the end of a failed command's stderr goes into the ledger detail.
STDERR_TAIL_CHARS = 200

# One template element, pre-parsed: literal text alternating with placeholder names.
_Element = tuple[tuple[str, str | None], ...]


def parse_template(template: str | Sequence[str]) -> tuple[str, ...]:
    """Split a command line with :func:`shlex.split` (a sequence is taken as argv already)
    and validate it. Raises ``ValueError`` with a one-line message for an empty command, bad
    quoting, a placeholder other than ``{hostname}`` / ``{instance_name}``, or a placeholder
    in the program name.
    """
    return _compile(template)[0]


def _compile(template: str | Sequence[str]) -> tuple[tuple[str, ...], tuple[_Element, ...]]:
    if isinstance(template, str):
        try:
            argv = tuple(shlex.split(template))
        except ValueError as exc:
            raise ValueError(f"restart command {template!r}: {exc}") from None
    else:
        argv = tuple(template)
    if not argv or not argv[0]:
        raise ValueError("restart command is empty")
    elements = tuple(_parse_element(element) for element in argv)
    if any(field for _, field in elements[0]):
        # A host name must never choose which program runs.
        raise ValueError(f"restart command {argv[0]!r}: the program name cannot be a placeholder")
    return argv, elements


def _parse_element(element: str) -> _Element:
    try:
        parts = list(string.Formatter().parse(element))
    except ValueError as exc:
        raise ValueError(f"restart command argument {element!r}: {exc}") from None
    parsed: list[tuple[str, str | None]] = []
    for literal, field, spec, conversion in parts:
        if field is not None and (field not in PLACEHOLDERS or spec or conversion):
            # Also refuses "{hostname.__class__}", "{hostname!r}", "{hostname:>9}": plain
            # names only, so formatting can never reach attributes or reshape a value.
            known = ", ".join(f"{{{name}}}" for name in sorted(PLACEHOLDERS))
            raise ValueError(
                f"restart command argument {element!r}: unknown placeholder; use {known}"
            )
        parsed.append((literal, field))
    return tuple(parsed)


def _fill(element: _Element, values: Mapping[str, str]) -> str:
    return "".join(literal + (values[field] if field else "") for literal, field in element)


def _refusal(message: Message) -> str | None:
    hostname, instance = message.hostname, message.instance_name
    # The leading "-" is what turns a value into an option (ssh -oProxyCommand=…); RFC 1123
    # already excludes it, and it is checked on its own so that this never depends on that.
    if hostname.startswith("-") or not _is_valid_hostname(hostname):
        return f"refusing hostname {hostname[:80]!r}: not a valid RFC 1123 name"
    if instance.startswith("-") or not is_valid_label(instance):
        return f"refusing instance name {instance[:80]!r}: not a valid RFC 1123 label"
    return None


def _is_valid_hostname(hostname: str) -> bool:
    try:
        validate_domain(hostname)
    except ValueError:
        return False
    return True


def _one_line_tail(data: bytes | None) -> str:
    text = " ".join((data or b"").decode("utf-8", "replace").split())
    return text[-STDERR_TAIL_CHARS:]


class CommandRestarter:
    """Runs ``argv_template`` filled in with the message's host; exit 0 means restarted.

    ``argv_template`` is a command line (split with :func:`shlex.split`) or an argv
    sequence; ``timeout`` bounds each run in seconds. Construction raises ``ValueError`` for
    a bad template or timeout. A command counts as running until its stderr closes: one that
    leaves a background process holding stderr (``ssh -f``) runs into the timeout.
    """

    def __init__(self, argv_template: str | Sequence[str], *, timeout: float) -> None:
        if not timeout > 0:  # also refuses NaN
            raise ValueError(f"restart command timeout must be > 0, not {timeout}")
        self.argv_template, self._elements = _compile(argv_template)
        self.timeout = timeout

    def argv_for(self, message: Message) -> list[str]:
        """The argv that :meth:`restart` runs for ``message``; raises :class:`RestartFailed`
        if the message's hostname or instance name is not safe to put on a command line."""
        refusal = _refusal(message)
        if refusal is not None:
            raise RestartFailed(refusal)
        values = {"hostname": message.hostname, "instance_name": message.instance_name}
        return [_fill(element, values) for element in self._elements]

    async def restart(self, message: Message) -> str:
        """Run the command and wait for it (up to ``timeout``); return ``"exit 0"``.

        Raises :class:`RestartFailed` without running anything for an unsafe host name, and
        for a command that cannot start, exits non-zero (with the tail of its stderr) or
        times out (it is killed). Cancellation kills the command and propagates.
        """
        argv = self.argv_for(message)
        with anyio.move_on_after(self.timeout) as scope:
            try:
                # No stdin: a command waiting for input would only time out. Its own session:
                # a Ctrl-C at the daemon's terminal must not kill a restart halfway; the
                # daemon's shutdown (grace, then cancel → kill) decides instead.
                result = await anyio.run_process(
                    argv,
                    check=False,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as exc:
                raise RestartFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        if scope.cancelled_caught:
            raise RestartFailed(f"timed out after {self.timeout:g}s")
        if result.returncode == 0:
            return "exit 0"
        tail = _one_line_tail(result.stderr)
        status = f"exit {result.returncode}"
        raise RestartFailed(f"{status}: {tail}" if tail else status)
