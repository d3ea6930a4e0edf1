"""The restart claims this daemon holds, by message id: reserved while its decision is
being committed, then held (a :class:`~mandrill.ledger.base.Claim`) until its outcome is
recorded.

This is what makes a claim that no task owns findable. The ledger's sweep resolves this
daemon's ``restarting`` rows whose message is not here: a decision whose COMMIT reached the
database but whose answer was lost, or that was cancelled mid-commit. Their restart never
began (every claim whose restart began stays here until its outcome is recorded), so they
end ``cancelled``, not counted, and their message is decided again when it comes back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from mandrill.ledger.base import Claim


class OwnedClaims:
    """Message ids of the claims this daemon holds. The loop's tasks change it; the sweep
    reads it inside its transaction, from the ledger's worker thread: hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: ``None`` while the decision is being committed, then the claim.
        self._held: dict[str, Claim | None] = {}

    def __len__(self) -> int:
        return len(self._held)

    def reserve(self, message_ids: Iterable[str]) -> list[str]:
        """Mark messages about to be claimed (before their transaction begins, so that a
        sweep never sees their claim unheld); returns those not held already."""
        with self._lock:
            held = self._held
            new = [message_id for message_id in message_ids if message_id not in held]
            for message_id in new:
                held[message_id] = None
        return new

    def hold(self, claims: Iterable[Claim]) -> None:
        with self._lock:
            for claim in claims:
                self._held[claim.message_id] = claim

    def release(self, message_ids: Iterable[str]) -> None:
        """Forget reservations that did not become claims (or whose fate is unknown: their
        transaction failed or was cancelled)."""
        with self._lock:
            for message_id in message_ids:
                if self._held.get(message_id, True) is None:
                    del self._held[message_id]

    def settled(self, claims: Iterable[Claim]) -> None:
        """Forget claims whose outcome is recorded."""
        with self._lock:
            for claim in claims:
                if self._held.get(claim.message_id) is claim:
                    del self._held[claim.message_id]

    def held(self) -> frozenset[str]:
        """The message ids held or reserved now."""
        with self._lock:
            return frozenset(self._held)

    def began(self) -> frozenset[str]:
        """The message ids of held claims whose restart began."""
        with self._lock:
            return frozenset(
                message_id for message_id, claim in self._held.items()
                if claim is not None and claim.began
            )

    def claims(self) -> list[Claim]:
        """The claims held now (for the status of restarts under way)."""
        with self._lock:
            return [claim for claim in self._held.values() if claim is not None]


__all__ = ["OwnedClaims"]
