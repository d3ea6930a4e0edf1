"""Taking from anyio memory object streams what is ready, without waiting."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

T = TypeVar("T")


def ready(stream: MemoryObjectReceiveStream[T]) -> Iterator[T]:
    """The items in ``stream`` now, oldest first, taken as the caller iterates: it stops at
    the first that would wait (empty, ended or closed), so a caller that stops early leaves
    the rest in the stream. Not a checkpoint: batch with it after an ``await``."""
    while True:
        try:
            yield stream.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return


__all__ = ["ready"]
