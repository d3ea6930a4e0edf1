"""One lease keeper for every held delivery: extends leases in batches before they expire."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus

from mandrill.holdings import Holdings
from mandrill.obs.counters import Counters
from mandrill.policy import leases_due
from mandrill.sources.base import Source
from mandrill.sources.limits import MAX_ACK_DEADLINE_SECONDS as MAX_EXTENSION

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Keeps held deliveries from being redelivered while they are worked on.

    Each tick extends every lease that would expire within ``margin`` by the source's ack
    deadline, in one request per batch; leases held past ``max_lease`` are abandoned, so a
    stuck worker cannot hold a message forever.
    """

    def __init__(
        self, source: Source, holdings: Holdings, counters: Counters, *, max_lease: float
    ) -> None:
        self._source = source
        self._holdings = holdings
        self._counters = counters
        self.max_lease = max_lease
        self.extension = min(MAX_EXTENSION, source.ack_deadline)
        # Tick often enough that a lease is extended at least twice before it could expire.
        self.interval = max(0.05, source.ack_deadline / 4)
        self.margin = source.ack_deadline / 2

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Runs until cancelled; raises :class:`~mandrill.errors.SourceError` if the
        source gives up."""
        task_status.started()
        while True:
            await self.tick()
            await anyio.sleep(self.interval)

    async def tick(self) -> None:
        now = anyio.current_time()
        extend, give_up = leases_due(
            list(self._holdings.leases()), now, self.margin, self.max_lease
        )
        if give_up:
            self._holdings.abandon(give_up)
            self._counters.leases_abandoned += len(give_up)
            log.warning(
                "%d deliveries held longer than the maximum lease (%.0fs): no longer extended,"
                " the source will redeliver them",
                len(give_up),
                self.max_lease,
            )
        if extend:
            await self._source.modify_ack_deadline(extend, self.extension)
            # Counted from before the request: the source may have started the lease then.
            self._holdings.extended(extend, now + self.extension)
            self._counters.lease_extensions += len(extend)
