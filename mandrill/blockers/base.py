"""What a blocker is, and :class:`Blockers`, which asks them before a restart and fails
closed.

A blocker answers one question just before a host is restarted: may it go ahead *now*?
``None`` is yes; a sentence is no, and says why. A blocker that cannot tell (its server
answers an error or nothing in time, its command cannot run, a bug) raises: the restart is
then blocked too, with that reason. A restart that goes ahead because a check was broken is
the accident blockers exist to prevent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mandrill.errors import BlockerError, describe
from mandrill.message import Message

log = logging.getLogger(__name__)

#: The blockers mandrill has, by :attr:`Blocker.name` (the metrics' ``blocker`` label).
BLOCKER_NAMES = ("alerts", "command")


class Blocker(Protocol):
    """Says whether a host may be restarted now.

    ``check`` returns ``None`` (go ahead) or the reason it may not, in one line. It raises
    :class:`~mandrill.errors.BlockerError` when it cannot tell; it bounds its own time
    (answering or raising within its time limit), and is cancellable.
    """

    #: A short word: the metrics' ``blocker`` label, and what reasons begin with.
    name: str

    async def check(self, message: Message) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Block:
    """One blocker's no: which, why, and whether because it could not tell."""

    blocker: str
    reason: str
    #: The blocker failed (and so blocked): an error, not an answer.
    error: bool = False

    def __str__(self) -> str:
        return f"{self.blocker}: {self.reason}"


class Blockers:
    """The blockers in force, asked in order.

    The worker asks :meth:`first` just before each restart; ``mandrill explain`` asks
    :meth:`every`, to list each no. Neither raises but cancellation.
    """

    def __init__(self, blockers: Sequence[Blocker]) -> None:
        self.blockers = tuple(blockers)

    def __bool__(self) -> bool:
        return bool(self.blockers)

    async def first(self, message: Message) -> Block | None:
        """The first blocker's no, without asking the others; ``None``: none says no."""
        for blocker in self.blockers:
            block = await ask(blocker, message)
            if block is not None:
                return block
        return None

    async def every(self, message: Message) -> list[Block]:
        """Every blocker's no (each is asked)."""
        blocks = [await ask(blocker, message) for blocker in self.blockers]
        return [block for block in blocks if block is not None]


async def ask(blocker: Blocker, message: Message) -> Block | None:
    """``blocker``'s answer for ``message`` as a :class:`Block`, failing closed: a blocker
    that raises blocks (a bug in one is logged with its traceback)."""
    try:
        reason = await blocker.check(message)
    except BlockerError as exc:
        return Block(blocker.name, f"cannot tell, so blocking: {describe(exc)}", error=True)
    except Exception as exc:
        log.exception("blocker %s raised unexpectedly for %s", blocker.name, message.hostname)
        return Block(blocker.name, f"cannot tell, so blocking: bug: {exc!r}", error=True)
    return None if reason is None else Block(blocker.name, reason)
