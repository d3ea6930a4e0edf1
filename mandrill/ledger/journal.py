"""Restart outcomes the ledger could not take, kept on local disk until it can.

A restart that happens while the ledger is unreachable must not be forgotten. Its claim
stays ``restarting`` meanwhile, and since the daemon cannot heartbeat either, another
daemon may resolve it as ``unknown`` (counted as a restart: never twice) once
``instance_timeout`` has passed. Its outcome is appended here instead (one JSON line,
fsynced) and written to the ledger once it is back, at the next start at the latest,
before any message is claimed: the real outcome then replaces the ``unknown`` guess.

Several daemons on one machine may share a journal (same ledger): every access holds an
exclusive ``flock`` on a lock file beside it, and the journal is rewritten by atomic rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import anyio

from mandrill.errors import LedgerError
from mandrill.policy import Outcome

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KeptOutcome:
    """How a claimed restart ended, for ``finish`` on the ledger named ``ledger``."""

    ledger: str
    restart_id: int
    finished_at: float
    outcome: Outcome
    detail: str
    #: The outcome's reason code (:class:`mandrill.policy.Reason`), or ``""``.
    reason: str = ""


class OutcomeJournal:
    """An append-only file of :class:`KeptOutcome`, for one ledger (``ledger_id``).

    Entries for other ledgers (a journal path shared by mistake) are left alone. Every
    method runs its file work in a worker thread and raises :class:`LedgerError` when the
    file cannot be read or written.
    """

    def __init__(self, path: str | os.PathLike[str], ledger_id: str) -> None:
        self.path = Path(path)
        self.ledger_id = ledger_id
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        # One thread at a time in this process; flock serialises the processes.
        self._limiter = anyio.CapacityLimiter(1)

    async def check(self) -> None:
        """Fail at start, not in the middle of an outage, if the journal cannot be written:
        opens it (and its lock file) for append, as :meth:`keep` will, creating its
        directory if missing. Files created only for the check are removed again."""
        await self._in_thread(self._check_writable)

    def _check_writable(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for place in (self.path, self._lock_path):
            existed = place.exists()
            with open(place, "a"):
                pass
            if not existed:
                place.unlink(missing_ok=True)

    async def keep(
        self, restart_id: int, finished_at: float, outcome: Outcome, detail: str,
        reason: str = "",
    ) -> None:
        await self.keep_many([(restart_id, finished_at, outcome, detail, reason)])

    async def keep_many(self, outcomes: list[tuple[int, float, Outcome, str, str]]) -> None:
        """Append ``(restart_id, finished_at, outcome, detail, reason)`` entries, on disk
        (fsynced) when it returns."""
        entries = [KeptOutcome(self.ledger_id, *outcome) for outcome in outcomes]
        await self._in_thread(self._append, entries)

    async def entries(self) -> list[KeptOutcome]:
        """What this ledger still has to take, oldest first."""
        lines = await self._in_thread(self._read_locked)
        return [entry for entry in map(_parse, lines) if entry and entry.ledger == self.ledger_id]

    async def forget(self, recorded: Collection[KeptOutcome]) -> None:
        """Drop entries the ledger has taken (kept since by anyone else stay)."""
        if recorded:
            await self._in_thread(self._drop, set(recorded))

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as exc:
            raise LedgerError(f"outcome journal {self.path}: {exc.strerror or exc}") from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _append(self, entries: list[KeptOutcome]) -> None:
        lines = "".join(json.dumps(asdict(entry), separators=(",", ":")) + "\n"
                        for entry in entries)
        with self._locked():
            _write_synced(self.path, "a", lines)

    def _read_locked(self) -> list[str]:
        if not self.path.exists():  # the common case: nothing was ever kept
            return []
        with self._locked():
            return self._read()

    def _read(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8") as journal:
                return [line for line in journal.read().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def _drop(self, recorded: set[KeptOutcome]) -> None:
        with self._locked():
            kept = [line for line in self._read() if _parse(line) not in recorded]
            if not kept:
                self.path.unlink(missing_ok=True)
                return
            temporary = self.path.with_name(self.path.name + ".tmp")
            _write_synced(temporary, "w", "".join(line + "\n" for line in kept))
            os.replace(temporary, self.path)


def _write_synced(path: Path, mode: str, text: str) -> None:
    """Write ``text`` and return only once it is on disk."""
    with open(path, mode, encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _parse(line: str) -> KeptOutcome | None:
    try:
        fields = json.loads(line)
        return KeptOutcome(
            ledger=str(fields["ledger"]),
            restart_id=int(fields["restart_id"]),
            finished_at=float(fields["finished_at"]),
            outcome=Outcome(fields["outcome"]),
            detail=str(fields["detail"]),
            reason=str(fields.get("reason", "")),
        )
    except (ValueError, TypeError, KeyError):
        # A line cut short by a crash mid-write; kept in the file for a human to see.
        log.warning("outcome journal: unreadable line ignored: %.200s", line)
        return None


def default_journal_path(ledger_id: str) -> Path:
    """``$XDG_STATE_HOME/mandrill/outcomes-<ledger hash>.jsonl`` (``~/.local/state``)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    digest = hashlib.sha256(ledger_id.encode()).hexdigest()[:16]
    return Path(state) / "mandrill" / f"outcomes-{digest}.jsonl"


__all__ = ["KeptOutcome", "OutcomeJournal", "default_journal_path"]
