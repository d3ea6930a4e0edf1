"""Block a restart when a command says no: ``--block-on-command 'check-drained {hostname}'``.

The command is an argv template like the command restarter's (``{hostname}`` and
``{instance_name}``, never a shell line) and runs the same way: in a session of its own,
its process group ended at its time limit. It also finds the host in its environment
(:data:`ENVIRONMENT`), for a script that would rather read it there. Exit 0 lets the restart
go ahead; any other exit blocks it, with the end of the command's stderr as the reason. A
command that cannot start, or runs past its time limit, blocks too (failing closed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from mandrill.errors import BlockerError
from mandrill.message import Message
from mandrill.restarters.command import (
    KILL_GRACE,
    ArgvTemplate,
    CommandTimedOut,
    run_command,
)

#: The variables the command finds the message in.
ENVIRONMENT = ("MANDRILL_HOSTNAME", "MANDRILL_INSTANCE_NAME", "MANDRILL_MESSAGE_ID")


class CommandBlocker:
    """Runs ``argv_template`` for the host about to be restarted; non-zero exit blocks.

    Construction raises ``ValueError`` (one line) for a bad template or time limit.
    """

    name = "command"

    def __init__(
        self,
        argv_template: str | Sequence[str],
        *,
        time_limit: float,
        kill_grace: float = KILL_GRACE,
    ) -> None:
        if not time_limit > 0:  # also refuses NaN
            raise ValueError(f"blocker command time limit must be > 0, not {time_limit}")
        self._template = ArgvTemplate(argv_template, "blocker command")
        self.time_limit = time_limit
        self.kill_grace = kill_grace

    async def check(self, message: Message) -> str | None:
        """Run the command: ``None`` on exit 0, else ``"exit N: <stderr's tail>"``. Raises
        :class:`BlockerError` for an unsafe host name (nothing runs), a command that cannot
        start or that runs past the time limit. Cancellation ends its process group."""
        try:
            argv = self._template.fill(message)
        except ValueError as exc:
            raise BlockerError(str(exc)) from None
        env = dict(os.environ)
        env.update(zip(ENVIRONMENT, (message.hostname, message.instance_name,
                                     message.message_id), strict=True))
        try:
            returncode, tail = await run_command(
                argv, time_limit=self.time_limit, kill_grace=self.kill_grace, env=env,
                what=f"blocker command for {message.hostname}",
            )
        except OSError as exc:
            raise BlockerError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        except CommandTimedOut as exc:
            raise BlockerError(f"{argv[0]!r} {exc}") from None
        if returncode == 0:
            return None
        status = f"{argv[0]!r} exit {returncode}"
        return f"{status}: {tail}" if tail else status
