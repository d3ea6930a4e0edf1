"""What a message source is: pull deliveries, settle them by ack id, dead-letter bad input."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from mandrill.message import Delivery


class Source(Protocol):
    """A subscription to pull from, with Pub/Sub's settlement semantics.

    Implementations chunk requests to their transport's size limits themselves and retry
    transient failures; they raise :class:`~mandrill.errors.SourceError` once a failure
    is permanent or retries are exhausted. They never drop an ack id silently.
    """

    #: Seconds a pulled delivery stays leased before the source redelivers it.
    ack_deadline: float
    #: True when :meth:`dead_letter` keeps the delivery somewhere (a dead-letter topic).
    keeps_dead_letters: bool

    def problem(self) -> str | None:
        """Why the source cannot be reached now (an outage its calls are retrying through),
        for readiness probes; ``None`` if it can."""
        ...

    async def pull(self, max_messages: int) -> Sequence[Delivery]:
        """Wait for up to ``max_messages`` deliveries; may return ``[]`` after a long poll."""
        ...

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        """Settle deliveries as done."""
        ...

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        """Extend the lease of deliveries to ``seconds`` from now; 0 nacks them.

        Transports that take whole seconds round up."""
        ...

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Send a delivery that will never succeed to the dead-letter topic, if any."""
        ...


class Topic(Protocol):
    """Somewhere to publish messages (the talk's publisher, replay, the dead-letter topic)."""

    async def publish(self, messages: Sequence[tuple[bytes, Mapping[str, str]]]) -> list[str]:
        """Publish ``(data, attributes)`` pairs; returns their message ids."""
        ...
