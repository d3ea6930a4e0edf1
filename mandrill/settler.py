"""Settlement in batches: acks and nacks are queued by workers and sent by one task.

Nothing queued is ever dropped: a failed request is retried by the source, and a source
that gives up raises, which stops the service (whose shutdown flushes again).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskStatus

from mandrill.errors import LedgerError
from mandrill.holdings import Holdings
from mandrill.message import Delivery
from mandrill.obs.counters import Counters
from mandrill.policy import DEFER_SECONDS
from mandrill.sources.base import Source

log = logging.getLogger(__name__)

#: Most ack ids sent per request by the settler (sources chunk further if they must).
MAX_BATCH = 1000
#: How long a settlement may wait for batch-mates; bounds publish → settle latency.
MAX_DELAY = 0.01


class Settler:
    """Queues acks, nacks and deferrals from workers without blocking them (freeing each
    delivery's in-flight slot at once), and sends them in batches from :meth:`run`."""

    def __init__(
        self,
        source: Source,
        holdings: Holdings,
        counters: Counters,
        *,
        max_batch: int = MAX_BATCH,
        max_delay: float = MAX_DELAY,
    ) -> None:
        self._source = source
        self._holdings = holdings
        self._counters = counters
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._acks: list[str] = []
        self._nacks: list[str] = []
        #: Deferred ack ids by the seconds they stay away (their lease is set to it).
        self._defers: dict[int, list[str]] = {}
        #: Settlements waiting for their outcome's ledger write (see :meth:`after`).
        self._after: deque[tuple[Awaitable[object], Delivery, Callable[[Delivery], None]]] = (
            deque()
        )
        self._pending = anyio.Event()
        self._full = anyio.Event()
        self._flushing = anyio.Lock()

    @property
    def pending(self) -> int:
        return (
            len(self._acks)
            + len(self._nacks)
            + sum(map(len, self._defers.values()))
            + len(self._after)
        )

    def after(
        self,
        recorded: Awaitable[object],
        delivery: Delivery,
        settle: Callable[[Delivery], None],
    ) -> None:
        """Queue ``settle(delivery)`` (:meth:`ack`, :meth:`nack` …) to run once ``recorded``
        (the ledger write of its outcome) is done, so that no ack goes out before its outcome
        is committed, while the worker moves on at once. Like every settlement, it frees the
        delivery's in-flight slot at once (a source that cannot be reached must not stop
        the daemon from working on what it can). A write that failed is logged; the delivery
        is settled anyway (its outcome is in the ledger's journal, or lost: the claim is
        resolved as unknown once this daemon stops)."""
        self._holdings.release(delivery.ack_id)
        self._after.append((recorded, delivery, settle))
        self._pending.set()

    def ack(self, delivery: Delivery) -> None:
        """Queue an ack (never blocks)."""
        self._holdings.release(delivery.ack_id)
        self._acks.append(delivery.ack_id)
        self._counters.acked += 1
        self._queued()

    def nack(self, delivery: Delivery) -> None:
        """Queue a nack: the source redelivers the message at once (never blocks)."""
        self._holdings.release(delivery.ack_id)
        self._nacks.append(delivery.ack_id)
        self._counters.nacked += 1
        self._queued()

    def defer(self, delivery: Delivery, seconds: int = DEFER_SECONDS) -> None:
        """Queue a delayed nack: redelivered after ``seconds`` (never blocks)."""
        self._holdings.release(delivery.ack_id)
        self._defers.setdefault(seconds, []).append(delivery.ack_id)
        self._counters.deferred += 1
        self._queued()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send queued settlements until cancelled. What is queued then is left for the
        service's final settlement (:meth:`flush` under its deadline).

        Raises :class:`~mandrill.errors.SourceError` if the source gives up.
        """
        task_status.started()
        while True:
            await self._pending.wait()
            with anyio.move_on_after(self._max_delay):
                await self._full.wait()
            await self.flush()

    async def flush(self) -> None:
        """Send everything queued now, after any flush already under way (so that the
        final settlement also waits for the run loop's requests in flight). Bounded only by
        the source's own retries: callers at shutdown bound it with a deadline."""
        async with self._flushing:
            await self._send_queued()

    async def _send_queued(self) -> None:
        self._pending = anyio.Event()
        self._full = anyio.Event()
        await self._settle_recorded(len(self._after))
        while self._acks or self._nacks or self._defers:
            sends: list[tuple[list[str], Callable[[list[str]], Awaitable[None]]]] = [
                (self._acks, self._source.acknowledge),
                (self._nacks, self._nack_now),
            ]
            sends += [(queue, self._nack_after(seconds)) for seconds, queue in self._defers.items()]
            for queue, send in sends:
                ids = queue[: self._max_batch]
                del queue[: self._max_batch]
                if not ids:
                    continue
                try:
                    await send(ids)
                except BaseException:
                    # Put back what was not sent (cancelled or failed): never drop an ack id.
                    queue[:0] = ids
                    raise
            for seconds in [seconds for seconds, queue in self._defers.items() if not queue]:
                del self._defers[seconds]

    async def _settle_recorded(self, count: int) -> None:
        """Settle the first ``count`` waiting for their writes (those queued as a flush
        begins: a flush does not chase those that come in while it waits)."""
        # In queue order, which is the ledger's commit order: after the first wait for a
        # batch, the others of that batch are done (an op awaited when done does not yield).
        # Interrupted (cancelled at the final settlement's deadline), the delivery is left
        # unsettled: the source redelivers it when its lease expires.
        for _ in range(count):
            recorded, delivery, settle = self._after.popleft()
            try:
                await recorded
            except LedgerError as exc:
                log.error("could not record the outcome of message %s: %s",
                          delivery.message_id, exc, extra={"message_id": delivery.message_id})
            settle(delivery)

    async def _nack_now(self, ack_ids: list[str]) -> None:
        await self._source.modify_ack_deadline(ack_ids, 0)

    def _nack_after(self, seconds: int) -> Callable[[list[str]], Awaitable[None]]:
        async def nack_later(ack_ids: list[str]) -> None:
            await self._source.modify_ack_deadline(ack_ids, seconds)

        return nack_later

    def _queued(self) -> None:
        self._pending.set()
        if self.pending >= self._max_batch:
            self._full.set()


__all__ = ["MAX_BATCH", "MAX_DELAY", "Settler"]
