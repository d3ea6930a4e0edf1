"""Blockers: checks asked just before each restart, which can hold it back (deferred, not
lost) and fail closed. :class:`Blockers` asks them; each is a small :class:`Blocker`."""

from __future__ import annotations

from mandrill.blockers.base import BLOCKER_NAMES, Block, Blocker, Blockers, ask

__all__ = ["BLOCKER_NAMES", "Block", "Blocker", "Blockers", "ask"]
