"""The deliveries this daemon holds: pulled and not yet settled.

The consumer adds, settlement removes, the lease keeper extends, and shutdown nacks what
is left. Its size is the in-flight bound: the consumer pulls only while there is room.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import anyio

from mandrill.message import Delivery


@dataclass(slots=True)
class Held:
    delivery: Delivery
    held_since: float
    lease_expires_at: float
    #: Set once the lease passed the maximum lease time and is no longer extended.
    abandoned: bool = False


class Holdings:
    """The deliveries held now, by ack id, with their leases; at most ``capacity``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._held: dict[str, Held] = {}
        self._room = anyio.Event()

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, ack_id: str) -> bool:
        return ack_id in self._held

    @property
    def room(self) -> int:
        return self.capacity - len(self._held)

    def add(self, delivery: Delivery, now: float, lease_seconds: float) -> None:
        self._held[delivery.ack_id] = Held(delivery, now, now + lease_seconds)

    def release(self, ack_id: str) -> Held | None:
        """Forget a delivery (it is being settled); wakes a consumer waiting for room."""
        held = self._held.pop(ack_id, None)
        if held is not None:
            self._room.set()
        return held

    async def wait_for_room(self) -> int:
        """Block until at least one more delivery may be held; returns how many."""
        while self.room <= 0:
            self._room = anyio.Event()
            await self._room.wait()
        return self.room

    def leases(self) -> Iterator[tuple[str, float, float]]:
        """``(ack_id, expires_at, held_since)`` of every lease still being kept."""
        for ack_id, held in self._held.items():
            if not held.abandoned:
                yield ack_id, held.lease_expires_at, held.held_since

    def extended(self, ack_ids: list[str], expires_at: float) -> None:
        for ack_id in ack_ids:
            held = self._held.get(ack_id)
            if held is not None:
                held.lease_expires_at = expires_at

    def abandon(self, ack_ids: list[str]) -> None:
        for ack_id in ack_ids:
            held = self._held.get(ack_id)
            if held is not None:
                held.abandoned = True

    def release_all(self) -> list[Delivery]:
        """Forget and return everything still held (for the final nack)."""
        deliveries = [held.delivery for held in self._held.values()]
        self._held.clear()
        self._room.set()
        return deliveries
