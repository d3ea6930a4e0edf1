"""Deliveries handed from the consumer to the daemon's long-lived workers.

A memory object stream would do, at a price paid per message: each time a worker waits
for work, anyio builds it a receiver record, an event and a task record, and checks the
waiting task for a pending cancellation when an item comes (measured: the hand-over was
the largest stage of a Pub/Sub drain, 35-50 µs a message). This one keeps, per waiting
worker, one event and a slot for its item; an item put while a worker waits goes straight
into its slot; a worker that finds items queued takes one without a trip through the event
loop (it waits in the ledger a moment later anyway).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class _Waiter(Generic[T]):
    __slots__ = ("event", "handed", "item")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.handed = False
        self.item: T | None = None


class Handover(Generic[T]):
    """Items for idle workers, first in first out. :meth:`put` never blocks: the caller
    bounds what is in flight (the daemon's holdings). :meth:`close` ends it: waiting
    workers, and those that come after the last item, get :class:`anyio.EndOfStream`."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiting: deque[_Waiter[T]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._waiting:
            waiter = self._waiting.popleft()
            waiter.item = item
            waiter.handed = True
            waiter.event.set()
        else:
            self._items.append(item)

    def close(self) -> None:
        self._closed = True
        while self._waiting:
            self._waiting.popleft().event.set()  # nothing handed: the end

    async def get(self) -> T:
        """The next item, waiting for one if there is none; raises
        :class:`anyio.EndOfStream` once closed and empty."""
        if self._items:
            return self._items.popleft()
        if self._closed:
            raise anyio.EndOfStream
        waiter: _Waiter[T] = _Waiter()
        self._waiting.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.handed:
                # Handed an item as it was cancelled: to another worker, never lost.
                self._items.appendleft(waiter.item)  # type: ignore[arg-type]
                self._wake_one()
            elif not self._closed:  # (closing let go of every waiter already)
                self._waiting.remove(waiter)
            raise
        if not waiter.handed:
            raise anyio.EndOfStream
        return waiter.item  # type: ignore[return-value]

    def _wake_one(self) -> None:
        if self._waiting and self._items:
            self.put(self._items.popleft())

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
