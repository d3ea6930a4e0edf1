"""An in-process broker with Pub/Sub's semantics, for the embedded default and for tests.

One topic, one subscription: ack deadlines, redelivery on nack or on expiry,
``modifyAckDeadline``, delivery attempts, and a dead-letter list after N attempts.
Lease times follow ``anyio.current_time()``, so trio's MockClock drives them in tests.
"""

from __future__ import annotations

import heapq
import itertools
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio

from mandrill.message import Delivery

#: How long an empty pull waits for a message before returning ``[]`` (Pub/Sub long-polls too).
DEFAULT_PULL_WAIT = 1.0
#: Stale expiry entries tolerated before the heap is rebuilt (amortised O(1) per ack).
COMPACT_SLACK = 1024


@dataclass(slots=True)
class _Stored:
    message_id: str
    data: bytes
    attributes: Mapping[str, str]
    publish_time: float
    attempts: int = 0


@dataclass(slots=True)
class _Lease:
    stored: _Stored
    expires_at: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    delivery: Delivery
    reason: str


@dataclass(slots=True)
class BrokerStats:
    published: int = 0
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    expired: int = 0
    nacked: int = 0


class MemoryBroker:
    """A topic and its one subscription, in memory. Implements ``Source`` and ``Topic``.

    ``max_delivery_attempts`` plays the subscription's dead-letter policy: a message
    delivered that many times and still not acked goes to :attr:`dead_letters`.
    """

    def __init__(
        self,
        *,
        ack_deadline: float = 10.0,
        max_delivery_attempts: int | None = None,
        pull_wait: float = DEFAULT_PULL_WAIT,
    ) -> None:
        self.ack_deadline = ack_deadline
        self.keeps_dead_letters = True
        self.max_delivery_attempts = max_delivery_attempts
        self.pull_wait = pull_wait
        self.dead_letters: list[DeadLetter] = []
        self.stats = BrokerStats()
        self._ready: deque[_Stored] = deque()
        self._leases: dict[str, _Lease] = {}
        self._expiries: list[tuple[float, str]] = []  # a heap; entries may be stale
        self._run_id = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self._ack_ids = itertools.count(1)
        self._changed = anyio.Event()

    # -- Topic -------------------------------------------------------------------------
    async def publish(self, messages: Sequence[tuple[bytes, Mapping[str, str]]]) -> list[str]:
        now = time.time()
        ids = []
        for data, attributes in messages:
            # Unique across runs too: the ledger outlives the broker and dedups by id.
            message_id = f"{self._run_id}-{next(self._ids)}"
            self._ready.append(_Stored(message_id, data, dict(attributes), now))
            ids.append(message_id)
        self.stats.published += len(ids)
        self._notify()
        await anyio.lowlevel.checkpoint()
        return ids

    # -- Source ------------------------------------------------------------------------
    def problem(self) -> str | None:
        return None  # in the process: it cannot be unreachable

    async def pull(self, max_messages: int) -> list[Delivery]:
        """Wait up to ``pull_wait`` for messages; leases up to ``max_messages`` of them."""
        give_up_at = anyio.current_time() + self.pull_wait
        while True:
            now = anyio.current_time()
            self._expire(now)
            if self._ready:
                return self._lease(max_messages, now)
            wait_until = give_up_at
            if self._expiries:
                wait_until = min(wait_until, self._expiries[0][0])
            if now >= give_up_at:
                await anyio.lowlevel.checkpoint()
                return []
            changed = self._changed
            with anyio.move_on_after(max(wait_until - now, 0)):
                await changed.wait()

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        for ack_id in ack_ids:
            # Like Pub/Sub, an ack for an expired or unknown ack id is ignored.
            if self._leases.pop(ack_id, None) is not None:
                self.stats.acked += 1
        self._compact()
        await anyio.lowlevel.checkpoint()

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        now = anyio.current_time()
        for ack_id in ack_ids:
            lease = self._leases.get(ack_id)
            if lease is None:
                continue
            if seconds <= 0:
                del self._leases[ack_id]
                self.stats.nacked += 1
                self._requeue(lease.stored, now)
            else:
                lease.expires_at = now + seconds
                heapq.heappush(self._expiries, (lease.expires_at, ack_id))
        self._compact()
        self._notify()
        await anyio.lowlevel.checkpoint()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.dead_letters.append(DeadLetter(delivery, reason))
        await anyio.lowlevel.checkpoint()

    # -- inspection, for tests and the demo's summary ------------------------------------
    @property
    def backlog(self) -> int:
        """Messages published and not acked (ready or leased)."""
        return len(self._ready) + len(self._leases)

    # -- internals -----------------------------------------------------------------------
    def _lease(self, max_messages: int, now: float) -> list[Delivery]:
        deliveries: list[Delivery] = []
        expires_at = now + self.ack_deadline
        while self._ready and len(deliveries) < max_messages:
            stored = self._ready.popleft()
            stored.attempts += 1
            ack_id = f"{stored.message_id}.{next(self._ack_ids)}"
            self._leases[ack_id] = _Lease(stored, expires_at)
            heapq.heappush(self._expiries, (expires_at, ack_id))
            deliveries.append(
                Delivery(
                    ack_id=ack_id,
                    message_id=stored.message_id,
                    data=stored.data,
                    attributes=stored.attributes,
                    publish_time=stored.publish_time,
                    delivery_attempt=stored.attempts,
                )
            )
        self.stats.delivered += len(deliveries)
        return deliveries

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, ack_id = heapq.heappop(self._expiries)
            lease = self._leases.get(ack_id)
            if lease is None or lease.expires_at > now:
                continue  # settled, or extended since this entry was pushed
            del self._leases[ack_id]
            self.stats.expired += 1
            self._requeue(lease.stored, now)

    def _compact(self) -> None:
        """Drop stale expiry entries (settled or extended leases) once they outnumber the
        live ones: without this the heap grows with every message for a whole ack deadline
        (measured: ~150 bytes per message, 36 MB at 4k msg/s with a 60 s deadline)."""
        if len(self._expiries) > 2 * len(self._leases) + COMPACT_SLACK:
            self._expiries = [(lease.expires_at, ack_id) for ack_id, lease in self._leases.items()]
            heapq.heapify(self._expiries)

    def _requeue(self, stored: _Stored, now: float) -> None:
        limit = self.max_delivery_attempts
        if limit is not None and stored.attempts >= limit:
            delivery = Delivery(
                f"{stored.message_id}.dead",
                stored.message_id,
                stored.data,
                stored.attributes,
                stored.publish_time,
                stored.attempts,
            )
            self.dead_letters.append(DeadLetter(delivery, f"delivered {stored.attempts} times"))
            return
        self.stats.redelivered += 1
        self._ready.append(stored)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


__all__ = ["BrokerStats", "DeadLetter", "MemoryBroker"]
