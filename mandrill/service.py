"""serve(): the daemon's task tree, and nothing else.

    serve (root task group)
    ├── signal watcher      first signal: graceful stop; second: force
    ├── ledger writer       batched commits
    ├── settler             batched acks and nacks
    ├── lease keeper        extends every held lease, in batches
    ├── extra services      metrics server, notifier (when configured)
    └── workers (task group, cancelled after the grace)
        ├── worker-0 … N    long-lived; each takes deliveries from one stream
        └── intake (task group, cancelled at the first signal)
            ├── consumer    pulls while there is room (backpressure)
            └── publisher   only in the embedded demo
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from mandrill.holdings import Holdings
from mandrill.lease import LeaseKeeper
from mandrill.ledger.base import Ledger
from mandrill.message import Delivery, Message
from mandrill.obs.counters import Counters
from mandrill.obs.metrics import Observability
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
Service = Callable[..., Coroutine[Any, Any, Any]]


@dataclass
class Parts:
    """The adapters serve() runs on; opened and closed by the caller."""

    source: Source
    ledger: Ledger
    restarter: Restarter
    publisher: Callable[[], Coroutine[Any, Any, Any]] | None = None
    services: Sequence[Service] = field(default_factory=list)
    #: Called with (message, outcome, detail) for every restart decision (notifications).
    on_decision: Callable[[Message, str, str], None] | None = None


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
    long-lived task are installed. Returns the counters. A failure of the service's own
    parts (source or ledger gone) runs the same shutdown path and then propagates in an
    ``ExceptionGroup``.
    """
    if observability is not None:
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
    )
    # The ledger writer and the settler must outlive the workers, whose cancellation
    # handlers still record and settle: they ignore outside cancellation and are stopped
    # explicitly once the final settlement is done.
    last_to_stop: list[anyio.CancelScope] = []

    async def until_stopped(service: Service, *, task_status: TaskStatus[None]) -> None:
        with anyio.CancelScope(shield=True) as scope:
            last_to_stop.append(scope)
            await service(task_status=task_status)

    async with anyio.create_task_group() as root:
        if settings.handle_signals:
            await root.start(watch_signals, shutdown, settings.grace, name="signal watcher")
        if observability is not None:
            # Started first, so the lag probe and the metrics server watch start-up too.
            observability.health.checks = {"ledger": parts.ledger.healthy}
            for name, service in observability.services(in_flight=holdings.__len__):
                await root.start(service, name=name)
        await root.start(until_stopped, parts.ledger.run, name="ledger writer")
        await root.start(until_stopped, settler.run, name="settler")
        await root.start(keeper.run, name="lease keeper")
        for service in parts.services:
            await root.start(service, name=getattr(service, "__qualname__", "service"))
        task_status.started(shutdown)
        if observability is not None:
            observability.health.set_serving()
        log.info("ready: consuming with up to %d in flight", settings.max_in_flight)
        try:
            await _process(settings, parts, worker, settler, holdings, counters, shutdown, root)
        finally:
            await _settle_held(holdings, settler, settings.settle_timeout)
            for scope in last_to_stop:
                scope.cancel()
            root.cancel_scope.cancel()
    log.info(
        "stopped (%s): %s; unsettled %d",
        shutdown.reason or "done",
        counters.summary(),
        settler.pending,
    )
    return counters


async def _process(
    settings: ServiceSettings,
    parts: Parts,
    worker: Worker,
    settler: Settler,
    holdings: Holdings,
    counters: Counters,
    shutdown: Shutdown,
    root: anyio.abc.TaskGroup,
) -> None:
    # Everything in the stream is also in holdings, whose size is bounded by the same
    # number: send_nowait below can never block.
    send, receive = anyio.create_memory_object_stream[Delivery](settings.max_in_flight)
    async with anyio.create_task_group() as workers:
        root.start_soon(_cancel_when, shutdown.forced, workers.cancel_scope, name="force watcher")
        async with receive:
            for number in range(settings.max_in_flight):
                workers.start_soon(
                    _work,
                    receive.clone(),
                    worker,
                    settler,
                    counters,
                    shutdown,
                    settings.stop_after,
                    name=f"worker-{number}",
                )
        async with anyio.create_task_group() as intake:
            intake.start_soon(_consume, parts.source, holdings, send, counters, name="consumer")
            if parts.publisher is not None:
                intake.start_soon(parts.publisher, name="publisher")
            await shutdown.requested.wait()
            intake.cancel_scope.cancel()
        # Pulling has stopped and the stream is closed: workers finish what they hold.
        log.info("stopped pulling; %d in flight, grace %.1fs", len(holdings), settings.grace)
        workers.cancel_scope.deadline = anyio.current_time() + settings.grace


async def _consume(
    source: Source,
    holdings: Holdings,
    send: MemoryObjectSendStream[Delivery],
    counters: Counters,
) -> None:
    async with send:
        while True:
            room = await holdings.wait_for_room()
            asked = min(room, MAX_PULL)
            deliveries = await source.pull(asked)
            now = anyio.current_time()
            for delivery in deliveries:
                if delivery.ack_id in holdings:
                    continue
                holdings.add(delivery, now, source.ack_deadline)
                send.send_nowait(delivery)
            if len(deliveries) < asked:
                await anyio.sleep(SHORT_PULL_PAUSE)


async def _work(
    receive: ObjectReceiveStream[Delivery],
    worker: Worker,
    settler: Settler,
    counters: Counters,
    shutdown: Shutdown,
    stop_after: int | None,
) -> None:
    async with receive:
        async for delivery in receive:
            if shutdown.requested.is_set():
                # Not started yet: hand it back at once rather than during the grace.
                settler.nack(delivery)
                continue
            await worker.handle(delivery)
            if stop_after is not None and counters.completed >= stop_after:
                shutdown.request(f"processed {counters.completed} messages")


async def _cancel_when(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _settle_held(holdings: Holdings, settler: Settler, limit: float) -> None:
    """Nack everything still held and flush pending settlements: shielded, bounded."""
    with anyio.move_on_after(limit, shield=True) as scope:
        held = holdings.release_all()
        for delivery in held:
            settler.nack(delivery)
        try:
            await settler.flush()
        except Exception as exc:
            log.error("could not settle %d messages at shutdown: %s", settler.pending, exc)
            return
        if held:
            log.info("nacked %d messages still held at shutdown", len(held))
    if scope.cancelled_caught:
        log.error("final settlement timed out after %.1fs; %d settlements not sent",
                  limit, settler.pending)
