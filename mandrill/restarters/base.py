"""What a restarter is: restart one host, or raise RestartFailed saying why."""

from __future__ import annotations

from typing import Protocol

from mandrill.message import Message


class Restarter(Protocol):
    """Restarts the host a message names.

    ``restart`` returns a short detail for the ledger (an exit code, an operation id) and
    raises :class:`~mandrill.errors.RestartFailed` when the restart did not happen. It may
    block for as long as a restart takes and must be cancellable.
    """

    async def restart(self, message: Message) -> str: ...
