"""Settlement, the last stages of a message: its outcome recorded, then its ack, nack or
deferral sent, in batches.

Every other stage hands a delivery on as a value (:class:`Settle`) through an
:class:`Outbox`, which frees the delivery's in-flight slot at once and never blocks. The
settler runs two tasks, one way: a recorder writes the outcomes of a batch in one ledger
transaction it awaits itself, then hands the batch to a sender, which acks, nacks and
defers. Nothing is acked before its outcome is kept (in the ledger, or in the outcome
journal while the ledger is down); and a source that does not answer (an outage, its
requests retried) holds up only the sending, never the recording: a claim does not stay
open, its host waiting, because an ack cannot go out. The settler ends when every outbox
is closed and all is sent, so the service's final settlement is the settler draining.

Nothing queued is ever dropped: a failed request is retried by the source, and a source
that gives up raises, which stops the service.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from itertools import islice
from types import TracebackType
from typing import NamedTuple

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mandrill.holdings import Holdings
from mandrill.ledger.base import Finish, Ledger
from mandrill.message import Delivery
from mandrill.obs.counters import Counters
from mandrill.policy import DEFER_SECONDS, Settlement, defer_seconds
from mandrill.shutdown import Shutdown
from mandrill.sources.base import Source
from mandrill.streams import ready

log = logging.getLogger(__name__)

#: Most ack ids sent per request by the settler (sources chunk further if they must).
MAX_BATCH = 1000
#: How long a settlement may wait for batch-mates; bounds publish → settle latency.
MAX_DELAY = 0.01


class Settle(NamedTuple):
    """A delivery to settle (ack, nack or defer), and the outcome to record first."""

    delivery: Delivery
    settlement: Settlement
    finish: Finish | None = None


def settle_stream() -> tuple[MemoryObjectSendStream[Settle], MemoryObjectReceiveStream[Settle]]:
    """The settler's stream: unbounded, so that handing on never blocks (what is in it is
    bounded by the daemon's holdings: every delivery in it was held)."""
    return anyio.create_memory_object_stream[Settle](math.inf)


class Outbox:
    """One task's way to the settler: :meth:`settle` frees the delivery's in-flight slot and
    hands it on (never blocks, and works in a cancelled task). Close it (or leave its
    ``with``) when the task is done: the settler ends once every outbox is closed."""

    def __init__(self, stream: MemoryObjectSendStream[Settle], holdings: Holdings) -> None:
        self._stream = stream
        self._holdings = holdings

    def settle(
        self, delivery: Delivery, settlement: Settlement, finish: Finish | None = None
    ) -> None:
        self._holdings.release(delivery.ack_id)
        self._stream.send_nowait(Settle(delivery, settlement, finish))

    def clone(self) -> Outbox:
        return Outbox(self._stream.clone(), self._holdings)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Settler:
    """Records outcomes and sends settlements in batches, from :meth:`run`."""

    def __init__(
        self,
        source: Source,
        ledger: Ledger,
        counters: Counters,
        stream: MemoryObjectReceiveStream[Settle],
        *,
        shutdown: Shutdown | None = None,
        stop_after: int | None = None,
        wall_clock: Callable[[], float] | None = None,
        defer: float = DEFER_SECONDS,
        max_batch: int = MAX_BATCH,
        max_delay: float = MAX_DELAY,
    ) -> None:
        self._source = source
        self._ledger = ledger
        self._counters = counters
        self._stream = stream
        self._shutdown = shutdown
        #: Request a graceful stop once this many messages are done.
        self._stop_after = stop_after
        self._wall_clock = wall_clock
        #: How long a deferred delivery stays away, at first (see policy.defer_seconds).
        self._defer = defer
        self._max_batch = max_batch
        self._max_delay = max_delay
        #: Settlements taken from the stream and not sent yet (for the summary).
        self._taken = 0

    @property
    def pending(self) -> int:
        """Settlements handed to the settler and not sent yet."""
        return self._taken + self._stream.statistics().current_buffer_used

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Record and send what the stream brings until every outbox is closed and all is
        sent.

        Raises :class:`~mandrill.errors.SourceError` if the source gives up. Cancelled (the
        final settlement's deadline), what is not sent is redelivered by the source when
        its lease expires.
        """
        recorded, to_send = anyio.create_memory_object_stream[list[Settle]](math.inf)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._send, to_send, name="settler: sender")
            task_status.started()
            with recorded:
                await self._record(recorded)

    async def _record(self, recorded: MemoryObjectSendStream[list[Settle]]) -> None:
        """Take batches from the stream, record their outcomes, hand them to the sender."""
        async with self._stream:
            while True:
                try:
                    first = await self._stream.receive()
                except anyio.EndOfStream:
                    return
                # Batch-mates come while this waits, without a wake each.
                await anyio.sleep(self._max_delay)
                batch = [first, *islice(ready(self._stream), self._max_batch - 1)]
                self._taken += len(batch)
                await self._keep_outcomes(batch)
                recorded.send_nowait(batch)

    async def _keep_outcomes(self, batch: list[Settle]) -> None:
        """Record the batch's outcomes; one that nothing durable keeps (ledger down, and
        no journal) turns its ack into a deferral: nothing acked without its record."""
        finishes = [item.finish for item in batch if item.finish is not None]
        if not finishes:
            return
        kept = await self._ledger.finish(finishes)
        unkept = {id(finish) for finish, ok in zip(finishes, kept, strict=True) if not ok}
        if unkept:
            for index, item in enumerate(batch):
                if item.settlement is Settlement.ACK and id(item.finish) in unkept:
                    batch[index] = item._replace(settlement=Settlement.DEFER)

    async def _send(self, to_send: MemoryObjectReceiveStream[list[Settle]]) -> None:
        """Send recorded batches (those that came while a send was under way, together)."""
        async with to_send:
            async for first in to_send:
                batch = list(first)
                for more in ready(to_send):
                    batch += more
                await self._settle(batch)

    async def _settle(self, batch: list[Settle]) -> None:
        acks: list[str] = []
        nacks: list[str] = []
        defers: dict[float, list[str]] = {}
        counters = self._counters
        now = self._wall_clock() if self._wall_clock is not None else None
        for item in batch:
            settlement, delivery = item.settlement, item.delivery
            if settlement is Settlement.ACK:
                acks.append(delivery.ack_id)
                if now is not None:
                    counters.latency.observe(now - delivery.publish_time)
            elif settlement is Settlement.NACK:
                nacks.append(delivery.ack_id)
            else:
                seconds = defer_seconds(delivery.delivery_attempt, self._defer)
                defers.setdefault(seconds, []).append(delivery.ack_id)
                counters.deferred += 1
        counters.acked += len(acks)
        counters.completed += len(acks)
        counters.nacked += len(nacks)
        if (
            self._stop_after is not None
            and self._shutdown is not None
            and counters.completed >= self._stop_after
        ):
            self._shutdown.request(f"processed {counters.completed} messages")
        sends: list[tuple[list[str], Callable[[Sequence[str]], Awaitable[None]]]] = [
            (acks, self._source.acknowledge),
            (nacks, self._nack_now),
        ]
        sends += [(ids, self._nack_after(seconds)) for seconds, ids in defers.items()]
        for ids, send in sends:
            for start in range(0, len(ids), self._max_batch):
                chunk = ids[start:start + self._max_batch]
                await send(chunk)
                self._taken -= len(chunk)

    async def _nack_now(self, ack_ids: Sequence[str]) -> None:
        await self._source.modify_ack_deadline(ack_ids, 0)

    def _nack_after(self, seconds: float) -> Callable[[Sequence[str]], Awaitable[None]]:
        async def nack_later(ack_ids: Sequence[str]) -> None:
            await self._source.modify_ack_deadline(ack_ids, seconds)

        return nack_later


__all__ = ["MAX_BATCH", "MAX_DELAY", "Outbox", "Settle", "Settler", "settle_stream"]
