"""Dead letters: messages that will never succeed (an invalid payload, a restart that failed
``--max-attempts`` times), kept with their reason, then settled. One task, fed by the
decider and the restart workers; it hands each message on to the settler.

A dead letter is published to the source's dead-letter topic first, then recorded in the
ledger, then acked: the history never shows a dead letter that was not published (where
there is a topic), and nothing is acked without its record, as everywhere on the path. A
publish that fails is the message's failure, not the daemon's: logged with the reason,
counted, and the message handed back (after a pause, so as not to spin on a topic that is
gone), so that Pub/Sub's own dead-letter policy takes it from there, or it is tried again
when it comes back. A record the ledger cannot take hands the message back too: the topic
may then get it twice (its ``mandrill_original_message_id`` attribute tells them apart).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from anyio.streams.memory import MemoryObjectReceiveStream

from mandrill.errors import LedgerError, SourceError
from mandrill.ledger.base import DeadLetterRecord, Ledger
from mandrill.obs.counters import Counters
from mandrill.policy import Settlement
from mandrill.settler import Outbox
from mandrill.sources.base import Source

log = logging.getLogger(__name__)


class DeadLetters:
    """Keeps and settles dead letters, from :meth:`run`."""

    def __init__(
        self,
        *,
        source: Source,
        ledger: Ledger,
        counters: Counters,
        outbox: Outbox,
        on_dead_letter: Callable[[DeadLetterRecord], None] | None = None,
    ) -> None:
        """``on_dead_letter`` is told of each message dead-lettered for good (published
        and recorded), synchronously: it must only queue (notifications)."""
        self._source = source
        self._ledger = ledger
        self._counters = counters
        self._outbox = outbox
        self._on_dead_letter = on_dead_letter

    async def run(self, letters: MemoryObjectReceiveStream[DeadLetterRecord]) -> None:
        """Keep and settle what ``letters`` brings until it ends."""
        with self._outbox:
            async with letters:
                async for letter in letters:
                    await self.keep(letter)

    async def keep(self, letter: DeadLetterRecord) -> None:
        """Publish ``letter`` to the dead-letter topic (if the source has one), record it,
        and settle its message: acked once published and recorded, handed back otherwise."""
        delivery = letter.delivery
        context = {"message_id": delivery.message_id}
        if self._source.keeps_dead_letters:
            try:
                await self._source.dead_letter(delivery, letter.detail)
            except SourceError as exc:
                self._counters.dead_letter_failures += 1
                log.error("could not publish dead letter %s (%s): %s; handing it back, for"
                          " the subscription's dead-letter policy or a later attempt",
                          delivery.message_id, letter.detail, exc, extra=context)
                await self._record_outcome(letter)
                self._outbox.settle(delivery, Settlement.DEFER)
                return
        try:
            await self._ledger.dead_letter([letter])
        except LedgerError as exc:
            log.log(logging.ERROR if self._ledger.healthy() else logging.DEBUG,
                    "could not record dead letter %s: %s; handing it back",
                    delivery.message_id, exc, extra=context)
            self._outbox.settle(delivery, Settlement.DEFER)
            return
        self._counters.dead_lettered += 1
        self._counters.dead_letter_reasons[letter.reason] += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter(letter)
        self._outbox.settle(delivery, Settlement.ACK)

    async def _record_outcome(self, letter: DeadLetterRecord) -> None:
        """The last restart's outcome of a message that could not be dead-lettered still
        ends its claim (kept in the journal if the ledger is down)."""
        if letter.finish is not None:
            await self._ledger.finish([letter.finish])


__all__ = ["DeadLetters"]
