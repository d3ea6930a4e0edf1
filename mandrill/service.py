"""serve(): the daemon's task tree, and nothing else.

The nesting is the order of shutdown: what must outlive the workers sits in an outer
group, and every shield carries a deadline.

    serve
    └── lasting (task group: outlives the workers; cancelled last)
        ├── signal watcher      first signal: graceful stop; second: force
        ├── probes              lag probe, metrics server, task dump (when configured)
        ├── ledger writer       batched commits
        ├── settler             batched acks and nacks
        ├── companions (task group: notifier …; stopped as the final settlement begins)
        └── daemon (task group)
            ├── lease keeper    extends every held lease, in batches
            └── workers (task group; deadline set to now + grace at the first signal)
                ├── worker-0 … N    long-lived; each takes one delivery at a time (Handover)
                └── intake (task group, cancelled at the first signal)
                    ├── consumer    pulls while there is room (backpressure)
                    └── publisher   only in the embedded demo

    final settlement (shielded, deadline ``settle_by``): nack what is held, flush the
    settler, drain the ledger; then ``lasting`` is cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus

from mandrill.handover import Handover
from mandrill.holdings import Holdings
from mandrill.lease import LeaseKeeper
from mandrill.ledger.base import Ledger
from mandrill.message import Delivery, Message
from mandrill.obs.counters import Counters
from mandrill.obs.metrics import Observability
from mandrill.policy import Outcome
from mandrill.restarters.base import Restarter
from mandrill.settler import Settler
from mandrill.shutdown import Shutdown, watch_signals
from mandrill.sources.base import Source
from mandrill.sources.limits import MAX_PULL_MESSAGES as MAX_PULL
from mandrill.worker import Worker, WorkerSettings

log = logging.getLogger(__name__)

#: Pause after a pull that brought less than asked for: a pull sent at once finds nothing
#: and waits in the server, which answers it late (measured with the emulator: p99
#: publish -> settle at 1,000 msg/s 78/104 ms without the pause, 35/33 ms with it).
SHORT_PULL_PAUSE = 0.005


@dataclass
class ServiceSettings:
    max_in_flight: int = 256
    grace: float = 10.0
    #: Bound on the shielded final settlement (nack what is held, flush acks).
    settle_timeout: float = 5.0
    max_lease: float = 3600.0
    #: Stop gracefully once this many messages are finished (acked or dead-lettered).
    stop_after: int | None = None
    handle_signals: bool = True


#: A long-lived task started in the root group, reporting readiness through task_status.
LongLived = Callable[..., Coroutine[Any, Any, Any]]


@dataclass
class Parts:
    """The adapters serve() runs on; opened and closed by the caller."""

    source: Source
    ledger: Ledger
    restarter: Restarter
    publisher: Callable[[], Coroutine[Any, Any, Any]] | None = None
    companions: Sequence[LongLived] = field(default_factory=list)
    #: Called with (message, outcome, detail) for every restart decision (notifications).
    on_decision: Callable[[Message, Outcome, str], None] | None = None


async def serve(
    settings: ServiceSettings,
    worker_settings: WorkerSettings,
    parts: Parts,
    *,
    shutdown: Shutdown | None = None,
    counters: Counters | None = None,
    observability: Observability | None = None,
    task_status: TaskStatus[Shutdown] = anyio.TASK_STATUS_IGNORED,
) -> Counters:
    """Run the daemon until a shutdown request (or ``stop_after``), then stop gracefully.

    Reports its :class:`Shutdown` through ``task_status`` once signal handlers and every
    long-lived task are installed. Returns the counters. ``observability`` brings its own
    shutdown and counters (give it, or them, not both).

    Bounded whatever the source and the ledger do: after the first signal it returns
    within ``grace + settle_timeout``; after a forced stop within ``settle_timeout``; a
    part failing during start-up raises at once. What could not be settled by then is
    logged with a count (the source redelivers it). A failure of the service's own parts
    (source or ledger gone) runs the same shutdown path and then propagates in an
    ``ExceptionGroup``.
    """
    if observability is not None:
        if shutdown not in (None, observability.shutdown) or counters not in (
            None, observability.counters
        ):
            raise ValueError("serve(): observability brings its own shutdown and counters")
        shutdown, counters = observability.shutdown, observability.counters
    shutdown = shutdown or Shutdown()
    counters = counters if counters is not None else Counters()
    holdings = Holdings(settings.max_in_flight)
    settler = Settler(parts.source, holdings, counters)
    keeper = LeaseKeeper(parts.source, holdings, counters, max_lease=settings.max_lease)
    worker = Worker(
        source=parts.source,
        ledger=parts.ledger,
        restarter=parts.restarter,
        settler=settler,
        counters=counters,
        settings=worker_settings,
        on_decision=parts.on_decision,
        shutdown=shutdown,
        stop_after=settings.stop_after,
    )
    async with anyio.create_task_group() as lasting:
        if settings.handle_signals:
            await lasting.start(watch_signals, shutdown, settings.grace, name="signal watcher")
        companions: anyio.CancelScope | None = None
        shields: list[anyio.CancelScope] = []
        try:
            # A signal during start-up (a ledger that hangs as it opens) stops it too.
            with anyio.CancelScope() as starting:
                watcher = await lasting.start(
                    _cancel_on_request, shutdown, starting, settings.settle_timeout,
                    name="start-up watcher",
                )
                if observability is not None:
                    # Started first, so the lag probe and the metrics server watch start-up.
                    for name, probe in observability.probes(in_flight=holdings.__len__):
                        await lasting.start(probe, name=name)
                for name, part in (("ledger writer", parts.ledger.run), ("settler", settler.run)):
                    await lasting.start(_outlive_the_workers, part, shields, name=name)
                companions = await lasting.start(
                    _run_companions, parts.companions, name="companions"
                )
            watcher.cancel()
            if not starting.cancel_called:
                async with anyio.create_task_group() as daemon:
                    await daemon.start(keeper.run, name="lease keeper")
                    task_status.started(shutdown)
                    if observability is not None:
                        observability.health.set_serving({"ledger": parts.ledger.healthy})
                    log.info("ready: consuming with up to %d in flight", settings.max_in_flight)
                    await _process(settings, parts, worker, settler, holdings, shutdown, daemon)
                    daemon.cancel_scope.cancel()
        finally:
            shutdown.settle_within(settings.settle_timeout)
            for shield in shields:
                shield.deadline = shutdown.settle_by
            if companions is not None:
                companions.cancel()
            await _settle_held(holdings, settler, parts.ledger, shutdown)
            for shield in shields:
                shield.cancel()
            lasting.cancel_scope.cancel()
    log.info(
        "stopped (%s): %s; unsettled %d",
        shutdown.reason or "done",
        counters.summary(),
        settler.pending,
    )
    return counters


async def _outlive_the_workers(
    part: LongLived, shields: list[anyio.CancelScope], *, task_status: TaskStatus[None]
) -> None:
    """Run ``part`` (the ledger writer, the settler) shielded, once started, from a caller
    cancelling serve(): cancelled workers still record and settle through it. The final
    settlement gives the shield its deadline (``settle_by``), then cancels it. Not shielded
    while it starts, so that a cancelled start-up never waits for it."""
    with anyio.CancelScope() as shield:
        shields.append(shield)
        await part(task_status=_ShieldOnceStarted(shield, task_status))


class _ShieldOnceStarted:
    def __init__(self, scope: anyio.CancelScope, status: TaskStatus[None]) -> None:
        self._scope = scope
        self._status = status

    def started(self, value: None = None) -> None:
        self._scope.shield = True
        self._status.started()


async def _cancel_on_request(
    shutdown: Shutdown,
    starting: anyio.CancelScope,
    settle_timeout: float,
    *,
    task_status: TaskStatus[anyio.CancelScope],
) -> None:
    """While the service starts, a shutdown request cancels the start-up (a ledger that
    hangs as this daemon registers)."""
    with anyio.CancelScope() as own:
        task_status.started(own)
        await shutdown.requested.wait()
        shutdown.settle_within(settle_timeout)
        starting.cancel()


async def _run_companions(
    companions: Sequence[LongLived], *, task_status: TaskStatus[anyio.CancelScope]
) -> None:
    """Start the companions (notifier …) in a group of their own, so that they can be
    stopped as the final settlement begins, their own final flush running beside it."""
    async with anyio.create_task_group() as group:
        for companion in companions:
            await group.start(companion, name=getattr(companion, "__qualname__", "companion"))
        task_status.started(group.cancel_scope)


async def _process(
    settings: ServiceSettings,
    parts: Parts,
    worker: Worker,
    settler: Settler,
    holdings: Holdings,
    shutdown: Shutdown,
    daemon: anyio.abc.TaskGroup,
) -> None:
    # Everything handed over is also in holdings, bounded by max_in_flight.
    handover: Handover[Delivery] = Handover()
    async with anyio.create_task_group() as workers:
        daemon.start_soon(
            _force_when_asked, shutdown, workers.cancel_scope, settings.settle_timeout,
            name="force watcher",
        )
        for number in range(settings.max_in_flight):
            workers.start_soon(
                _work, handover, worker, settler, shutdown, name=f"worker-{number}"
            )
        async with anyio.create_task_group() as intake:
            intake.start_soon(_consume, parts.source, holdings, handover, name="consumer")
            if parts.publisher is not None:
                intake.start_soon(parts.publisher, name="publisher")
            await shutdown.requested.wait()
            intake.cancel_scope.cancel()
        # Pulling has stopped and the hand-over is closed: workers finish what they hold.
        log.info("stopped pulling; %d in flight, grace %.1fs", len(holdings), settings.grace)
        workers.cancel_scope.deadline = anyio.current_time() + settings.grace
        shutdown.settle_within(settings.grace + settings.settle_timeout)


async def _consume(source: Source, holdings: Holdings, handover: Handover[Delivery]) -> None:
    try:
        while True:
            room = await holdings.wait_for_room()
            asked = min(room, MAX_PULL)
            deliveries = await source.pull(asked)
            now = anyio.current_time()
            for delivery in deliveries:
                if delivery.ack_id in holdings:
                    continue
                holdings.add(delivery, now, source.ack_deadline)
                handover.put(delivery)
            if len(deliveries) < asked:
                await anyio.sleep(SHORT_PULL_PAUSE)
    finally:
        handover.close()


async def _work(
    handover: Handover[Delivery], worker: Worker, settler: Settler, shutdown: Shutdown
) -> None:
    async for delivery in handover:
        if shutdown.requested.is_set():
            # Not started yet: hand it back at once rather than during the grace.
            settler.nack(delivery)
            continue
        await worker.handle(delivery)


async def _force_when_asked(
    shutdown: Shutdown, workers: anyio.CancelScope, settle_timeout: float
) -> None:
    await shutdown.forced.wait()
    shutdown.settle_within(settle_timeout)
    workers.cancel()


async def _settle_held(
    holdings: Holdings, settler: Settler, ledger: Ledger, shutdown: Shutdown
) -> None:
    """Nack everything still held, flush pending settlements and let the ledger commit
    what is queued: shielded, and bounded by ``shutdown.settle_by``."""
    with anyio.CancelScope(shield=True, deadline=shutdown.settle_by) as scope:
        held = holdings.release_all()
        for delivery in held:
            settler.nack(delivery)
        try:
            await settler.flush()
        except Exception as exc:
            log.error("could not settle %d messages at shutdown: %s; the source redelivers"
                      " them when their leases expire", settler.pending, exc)
        else:
            if held:
                log.info("nacked %d messages still held at shutdown", len(held))
        await ledger.drain()
    if scope.cancelled_caught:
        if settler.pending:
            log.error(
                "final settlement cut short by its deadline: %d settlements not sent; the"
                " source redelivers those messages when their leases expire",
                settler.pending,
            )
        else:
            log.error("final settlement cut short by its deadline: the ledger is still"
                      " writing (a write hangs)")
