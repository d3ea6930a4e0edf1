"""Restart a host by running a command, e.g. ``ssh {hostname} sudo reboot``.

The command is an argv template, never a shell line: each element is formatted on its own
with ``{hostname}`` and ``{instance_name}``, so a value fills at most part of one argument
and is never split or interpreted. Values are validated again here (RFC 1123, no leading
``-``) even though the message parser already did: a hostname is the only input an
attacker controls, and this is where it reaches ``exec``.

The command runs in a session (so a process group) of its own: a Ctrl-C at the daemon's
terminal does not reach it, and everything it starts can be ended together. On timeout and
on cancellation (the daemon's shutdown, after its grace) the whole group gets SIGTERM, then
SIGKILL after ``kill_grace`` seconds, and the command is reaped; the timeout's detail says
which it took. When the daemon itself is killed outright (SIGKILL, OOM killer), nothing is
left to do either: the command runs to its end. That is the chosen behaviour, not an
accident: a restart under way is not cut halfway by the daemon's death, and its claim is
later resolved as ``unknown`` (counted as a restart). A command that must not outlive the
daemon by much bounds itself (``timeout 60 ssh …``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import string
import subprocess
from collections.abc import Mapping, Sequence

import anyio
from anyio.abc import Process

from mandrill.errors import RestartFailed, one_line
from mandrill.message import Message, is_valid_label, validate_domain

#: The names a template may use, as ``{name}``.
PLACEHOLDERS = frozenset({"hostname", "instance_name"})

#: How much of the end of a failed command's stderr goes into the ledger detail.
STDERR_TAIL_CHARS = 200
#: Bytes of stderr kept while the command runs (the tail is cut from these).
STDERR_KEEP_BYTES = 4096
#: Between SIGTERM to a command's process group and SIGKILL.
KILL_GRACE = 2.0
#: How long a SIGKILLed group may take to vanish (a process in uninterruptible sleep).
KILL_WAIT = 5.0
#: How often a process group that was signalled is checked: nothing tells us when the
#: last of its members is gone (they are not our children), so it is polled.
GROUP_POLL_SECONDS = 0.02

log = logging.getLogger(__name__)

# One template element, pre-parsed: literal text alternating with placeholder names.
_Element = tuple[tuple[str, str | None], ...]


def parse_template(template: str | Sequence[str]) -> tuple[str, ...]:
    """Split a command line with :func:`shlex.split` (a sequence is taken as argv already)
    and validate it. Raises ``ValueError`` with a one-line message for an empty command, bad
    quoting, a placeholder other than ``{hostname}`` / ``{instance_name}``, or a placeholder
    in the program name.
    """
    return ArgvTemplate(template).argv


class ArgvTemplate:
    """A command line (split with :func:`shlex.split`) or argv sequence whose elements may
    hold ``{hostname}`` and ``{instance_name}``; ``what`` names it in errors. Construction
    raises ``ValueError`` as :func:`parse_template` says."""

    def __init__(self, template: str | Sequence[str], what: str = "restart command") -> None:
        self.what = what
        self.argv, self._elements = _compile(template, what)

    def fill(self, message: Message) -> list[str]:
        """The argv for ``message``; raises ``ValueError`` (one line) if its hostname or
        instance name is not safe to put on a command line."""
        refusal = _refusal(message)
        if refusal is not None:
            raise ValueError(refusal)
        values = {"hostname": message.hostname, "instance_name": message.instance_name}
        return [_fill(element, values) for element in self._elements]


def _compile(
    template: str | Sequence[str], what: str
) -> tuple[tuple[str, ...], tuple[_Element, ...]]:
    if isinstance(template, str):
        try:
            argv = tuple(shlex.split(template))
        except ValueError as exc:
            raise ValueError(f"{what} {template!r}: {exc}") from None
    else:
        argv = tuple(template)
    if not argv or not argv[0]:
        raise ValueError(f"{what} is empty")
    elements = tuple(_parse_element(element, what) for element in argv)
    if any(field for _, field in elements[0]):
        # A host name must never choose which program runs.
        raise ValueError(f"{what} {argv[0]!r}: the program name cannot be a placeholder")
    return argv, elements


def _parse_element(element: str, what: str) -> _Element:
    try:
        parts = list(string.Formatter().parse(element))
    except ValueError as exc:
        raise ValueError(f"{what} argument {element!r}: {exc}") from None
    parsed: list[tuple[str, str | None]] = []
    for literal, field, spec, conversion in parts:
        if field is not None and (field not in PLACEHOLDERS or spec or conversion):
            # Also refuses "{hostname.__class__}", "{hostname!r}", "{hostname:>9}": plain
            # names only, so formatting can never reach attributes or reshape a value.
            known = ", ".join(f"{{{name}}}" for name in sorted(PLACEHOLDERS))
            raise ValueError(f"{what} argument {element!r}: unknown placeholder; use {known}")
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
    return one_line((data or b"").decode("utf-8", "replace"))[-STDERR_TAIL_CHARS:]


class CommandRestarter:
    """Runs ``argv_template`` filled in with the message's host; exit 0 means restarted.

    ``argv_template`` is a command line (split with :func:`shlex.split`) or an argv
    sequence; ``timeout`` bounds each run in seconds. Construction raises ``ValueError`` for
    a bad template or timeout. A command counts as running until its stderr closes: one that
    leaves a background process holding stderr (``ssh -f``) runs into the timeout.
    """

    def __init__(
        self, argv_template: str | Sequence[str], *, timeout: float, kill_grace: float = KILL_GRACE
    ) -> None:
        if not timeout > 0:  # also refuses NaN
            raise ValueError(f"restart command timeout must be > 0, not {timeout}")
        self._template = ArgvTemplate(argv_template)
        self.argv_template = self._template.argv
        self.timeout = timeout
        self.kill_grace = kill_grace

    def argv_for(self, message: Message) -> list[str]:
        """The argv that :meth:`restart` runs for ``message``; raises :class:`RestartFailed`
        if the message's hostname or instance name is not safe to put on a command line."""
        try:
            return self._template.fill(message)
        except ValueError as exc:
            raise RestartFailed(str(exc)) from None

    async def restart(self, message: Message) -> str:
        """Run the command and wait for it (up to ``timeout``); return ``"exit 0"``.

        Raises :class:`RestartFailed` without running anything for an unsafe host name, and
        for a command that cannot start, exits non-zero (with the tail of its stderr) or
        times out (its process group is terminated). Cancellation terminates the process
        group (shielded, within ``kill_grace`` plus a few seconds) and propagates.
        """
        argv = self.argv_for(message)
        try:
            returncode, tail = await run_command(
                argv, time_limit=self.timeout, kill_grace=self.kill_grace,
                what=f"restart command for {message.hostname}",
            )
        except OSError as exc:
            raise RestartFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        except CommandTimedOut as exc:
            raise RestartFailed(str(exc)) from None
        if returncode == 0:
            return "exit 0"
        status = f"exit {returncode}"
        raise RestartFailed(f"{status}: {tail}" if tail else status)


class CommandTimedOut(Exception):
    """A command ran into its timeout; the message says so, and how its group ended."""


async def run_command(
    argv: Sequence[str],
    *,
    time_limit: float,
    kill_grace: float = KILL_GRACE,
    env: Mapping[str, str] | None = None,
    what: str = "command",
) -> tuple[int, str]:
    """Run ``argv`` in a session of its own (no stdin, stdout discarded) and wait for it,
    up to ``time_limit`` seconds; return its exit code and the one-line tail of its stderr.

    Raises ``OSError`` when it cannot start, :class:`CommandTimedOut` when it runs into
    ``time_limit`` (its process group is terminated first: more than a cancel scope does,
    hence not the caller's scope). Cancellation terminates the process
    group (shielded, within ``kill_grace`` plus a few seconds), logs it as ``what``, and
    propagates. See the module docstring for why a session and a process group.
    """
    # No stdin: a command waiting for input would only time out.
    process = await anyio.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    async with process:
        try:
            with anyio.move_on_after(time_limit) as scope:
                stderr = await _read_tail(process)
                returncode = await process.wait()
        except BaseException:
            ended = await _end_group(process, kill_grace)
            log.warning("%s cancelled; %s", what, ended)
            raise
        if scope.cancelled_caught:
            ended = await _end_group(process, kill_grace)
            raise CommandTimedOut(f"timed out after {time_limit:g}s; {ended}")
    return returncode, _one_line_tail(bytes(stderr))


async def _end_group(process: Process, kill_grace: float) -> str:
    """SIGTERM the command's process group, SIGKILL it after ``kill_grace``, reap the
    command; say which it took. Shielded, as it runs when the caller is cancelled, and
    bounded by the two waits."""
    group = process.pid  # the leader of its own session: its pid is the group's id
    bound = anyio.current_time() + kill_grace + KILL_WAIT
    with anyio.CancelScope(shield=True, deadline=bound):
        _signal_group(group, signal.SIGTERM)
        with anyio.move_on_after(kill_grace):
            await _wait_for_group(process, group)
            return "process group terminated (SIGTERM)"
        _signal_group(group, signal.SIGKILL)
        with anyio.move_on_after(KILL_WAIT):
            await _wait_for_group(process, group)
            return f"process group killed (SIGKILL after {kill_grace:g}s)"
    return f"process group sent SIGKILL after {kill_grace:g}s but still running"


async def _read_tail(process: Process) -> bytearray:
    """Read stderr to its end, keeping the last :data:`STDERR_KEEP_BYTES`."""
    kept = bytearray()
    assert process.stderr is not None
    async for chunk in process.stderr:
        kept += chunk
        del kept[:-STDERR_KEEP_BYTES]
    return kept


def _signal_group(group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(group, signum)


async def _wait_for_group(process: Process, group: int) -> None:
    await process.wait()
    while _group_alive(group):  # noqa: ASYNC110 - no event tells (GROUP_POLL_SECONDS)
        await anyio.sleep(GROUP_POLL_SECONDS)


def _group_alive(group: int) -> bool:
    """Whether a process of ``group`` still runs. Zombies do not count: they are dead, and
    may wait for ever for an init that does not reap (some containers' pid 1)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:  # no procfs: a member the kernel knows of is alive
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                # "pid (comm) state ppid pgrp …": comm may hold anything but its last ")".
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] not in (b"Z", b"X"):
            return True
    return False
