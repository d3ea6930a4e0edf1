"""serve(): the daemon's task tree, and nothing else.

A delivery flows one way: intake (consumer) → decider → restart workers → settler, with
dead letters beside; each stage hands values on through memory object streams and never
calls back. The nesting is the order of shutdown: what must outlive the workers sits in an
outer group, and every shield carries a deadline.

    serve
    └── lasting (task group: outlives the workers; cancelled last)
        ├── signal watcher      first signal: graceful stop; second: force
        ├── probes              lag probe, metrics server, task dump, systemd notifier (each
        │                       when configured; not when the caller runs them already, as
        │                       ``run`` does)
        ├── ledger              heartbeat, sweep of claims nobody holds, kept outcomes
        ├── settler             outcomes recorded, then acks and nacks, in batches
        ├── companions (task group: notifier …; stopped as the final settlement begins)
        └── daemon (task group)
            ├── lease keeper    extends every held lease, in batches
            └── work (task group; deadline set to now + grace at the first signal)
                ├── worker-0 … N    long-lived; each restarts one claimed host at a time
                ├── dead letters    publish, record, settle
                └── intake (task group, cancelled at the first signal)
                    ├── consumer    pulls while there is room (backpressure)
                    ├── decider     one ledger transaction per batch of deliveries
                    └── publisher   only in the embedded demo

    final settlement (shielded, deadline ``settle_by``): claims never started and dead
    letters never kept are handed to the settler (nacked), so is everything still held;
    the settler drains its stream and ends; the ledger resolves this daemon's open claims
    and marks it stopped; then ``lasting`` is cancelled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mandrill.blockers import Blockers
from mandrill.dead_letters import DeadLetters
from mandrill.decider import Decider
from mandrill.holdings import Holdings
from mandrill.lease import LeaseKeeper
from mandrill.ledger.base import DeadLetterRecord, Finish, Ledger
from mandrill.ledger.breaker import Breaker
from mandrill.message import Delivery, Message
from mandrill.obs.counters import Counters
from mandrill.obs.metrics import Observability
from mandrill.policy import DEFER_SECONDS, NOT_STARTED_DETAIL, Outcome, Reason, Settlement
from mandrill.restarters.base import Restarter
from mandrill.settler import Outbox, Settler, settle_stream
from mandrill.shutdown import Shutdown, watch_signals
from mandrill.sources.base import Source
from mandrill.sources.limits import MAX_PULL_MESSAGES as MAX_PULL
from mandrill.streams import ready
from mandrill.worker import SHUTTING_DOWN, Claimed, Worker, WorkerSettings

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
    #: How long a message handed back for later (its host busy, the ledger down) stays
    #: away at first; longer after a few deliveries (policy.defer_seconds).
    defer: float = DEFER_SECONDS


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
    #: Called when this daemon's decision opens the fleet's restart-storm breaker.
    on_breaker: Callable[[Breaker], None] | None = None
    #: Called with each message dead-lettered for good (notifications).
    on_dead_letter: Callable[[DeadLetterRecord], None] | None = None
    #: Asked just before each restart (``--block-on-alerts``, ``--block-on-command``).
    blockers: Blockers | None = None


@dataclass
class _Streams:
    """The streams between the stages. Each sending task holds a clone of its own and
    closes it when it ends; serve() keeps the originals until the final settlement, which
    drains what no stage took."""

    pulled: tuple[MemoryObjectSendStream[Sequence[Delivery]],
                  MemoryObjectReceiveStream[Sequence[Delivery]]]
    restarts: tuple[MemoryObjectSendStream[Claimed], MemoryObjectReceiveStream[Claimed]]
    letters: tuple[MemoryObjectSendStream[DeadLetterRecord],
                   MemoryObjectReceiveStream[DeadLetterRecord]]

    @classmethod
    def open(cls) -> _Streams:
        # Unbounded: handing on never blocks; what is in them is bounded by the holdings.
        return cls(
            anyio.create_memory_object_stream[Sequence[Delivery]](math.inf),
            anyio.create_memory_object_stream[Claimed](math.inf),
            anyio.create_memory_object_stream[DeadLetterRecord](math.inf),
        )

    def close(self) -> None:
        for send, receive in (self.pulled, self.restarts, self.letters):
            send.close()
            receive.close()


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

    def breaker_open() -> bool:
        return parts.ledger.breaker() is not None

    to_settler, settling = settle_stream()
    outbox = Outbox(to_settler, holdings)
    settler = Settler(
        parts.source, parts.ledger, counters, settling, shutdown=shutdown,
        stop_after=settings.stop_after, wall_clock=worker_settings.wall_clock,
        defer=settings.defer,
    )
    #: Set when the settler ends (never, if it did not start: then not waited for).
    settled: anyio.Event | None = None
    keeper = LeaseKeeper(parts.source, holdings, counters, max_lease=settings.max_lease)
    streams = _Streams.open()
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
                    observability.count_in_flight(holdings.__len__)
                    observability.watch_breaker(breaker_open)
                if observability is not None and not observability.started:
                    # Started first, so the lag probe and the metrics server watch start-up.
                    probes = observability.probes(
                        in_flight=holdings.__len__,
                        breaker_open=breaker_open,
                    )
                    for name, probe in probes:
                        await lasting.start(probe, name=name)
                await lasting.start(parts.ledger.run, name="ledger")
                settled = anyio.Event()
                await lasting.start(
                    _outlive_the_workers, _signalling(settler.run, settled), shields,
                    name="settler",
                )
                companions = await lasting.start(
                    _run_companions, parts.companions, name="companions"
                )
            watcher.cancel()
            if not starting.cancel_called:
                async with anyio.create_task_group() as daemon:
                    await daemon.start(keeper.run, name="lease keeper")
                    task_status.started(shutdown)
                    if observability is not None:
                        observability.health.set_serving(
                            {"source": parts.source.problem, "ledger": parts.ledger.problem}
                        )
                    log.info("ready: consuming with up to %d in flight", settings.max_in_flight)
                    await _process(
                        settings, worker_settings, parts, counters, holdings, outbox, streams,
                        shutdown, daemon,
                    )
                    daemon.cancel_scope.cancel()
        finally:
            shutdown.settle_within(settings.settle_timeout)
            for shield in shields:
                shield.deadline = shutdown.settle_by
            if companions is not None:
                companions.cancel()
            with settling:  # the settler's stream, closed whether or not it ran
                await _final_settlement(holdings, outbox, streams, settler, settled,
                                        parts.ledger, shutdown, counters)
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


def _signalling(run: LongLived, done: anyio.Event) -> LongLived:
    """``run``, setting ``done`` when it ends (the settler: its stream has ended, or it
    failed and nothing more will be settled)."""

    async def run_then_signal(*, task_status: TaskStatus[None]) -> None:
        try:
            await run(task_status=task_status)
        finally:
            done.set()

    return run_then_signal


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
    worker_settings: WorkerSettings,
    parts: Parts,
    counters: Counters,
    holdings: Holdings,
    outbox: Outbox,
    streams: _Streams,
    shutdown: Shutdown,
    daemon: anyio.abc.TaskGroup,
) -> None:
    (pulled, to_decide), (claimed, to_restart), (lettered, to_keep) = (
        streams.pulled, streams.restarts, streams.letters
    )
    decider = Decider(
        ledger=parts.ledger, settings=worker_settings, counters=counters, shutdown=shutdown,
        outbox=outbox.clone(), restarts=claimed.clone(), dead_letters=lettered.clone(),
        on_decision=parts.on_decision, on_breaker=parts.on_breaker,
    )
    dead_letters = DeadLetters(
        source=parts.source, ledger=parts.ledger, counters=counters, outbox=outbox.clone(),
        on_dead_letter=parts.on_dead_letter,
    )
    slots = min(settings.max_in_flight,
                worker_settings.max_concurrent_restarts or settings.max_in_flight)
    async with anyio.create_task_group() as work:
        daemon.start_soon(
            _force_when_asked, shutdown, work.cancel_scope, settings.settle_timeout,
            name="force watcher",
        )
        for number in range(slots):
            worker = Worker(
                restarter=parts.restarter, settings=worker_settings, counters=counters,
                shutdown=shutdown, outbox=outbox.clone(), dead_letters=lettered.clone(),
                on_decision=parts.on_decision, blockers=parts.blockers,
            )
            work.start_soon(worker.run, to_restart.clone(), name=f"worker-{number}")
        work.start_soon(dead_letters.run, to_keep.clone(), name="dead letters")
        async with anyio.create_task_group() as intake:
            intake.start_soon(_consume, parts.source, holdings, pulled.clone(), name="consumer")
            intake.start_soon(decider.run, to_decide.clone(), name="decider")
            if parts.publisher is not None:
                intake.start_soon(parts.publisher, name="publisher")
            # The originals stay with serve() for the final settlement: the stages end as
            # the streams they take from end (the decider's restarts, then the workers').
            claimed.close()
            lettered.close()
            await shutdown.requested.wait()
            intake.cancel_scope.cancel()
        # Pulling has stopped: workers finish what they hold; claims not started yet are
        # handed back (they see the shutdown), and the stages end as their streams do.
        log.info("stopped pulling; %d in flight, grace %.1fs", len(holdings), settings.grace)
        work.cancel_scope.deadline = anyio.current_time() + settings.grace
        shutdown.settle_within(settings.grace + settings.settle_timeout)


async def _consume(
    source: Source, holdings: Holdings, pulled: MemoryObjectSendStream[Sequence[Delivery]]
) -> None:
    with pulled:
        while True:
            room = await holdings.wait_for_room()
            asked = min(room, MAX_PULL)
            deliveries = await source.pull(asked)
            now = anyio.current_time()
            fresh = [delivery for delivery in deliveries if delivery.ack_id not in holdings]
            for delivery in fresh:
                holdings.add(delivery, now, source.ack_deadline)
            if fresh:
                pulled.send_nowait(fresh)
            if len(deliveries) < asked:
                await anyio.sleep(SHORT_PULL_PAUSE)


async def _force_when_asked(
    shutdown: Shutdown, workers: anyio.CancelScope, settle_timeout: float
) -> None:
    await shutdown.forced.wait()
    shutdown.settle_within(settle_timeout)
    workers.cancel()


async def _final_settlement(
    holdings: Holdings,
    outbox: Outbox,
    streams: _Streams,
    settler: Settler,
    settled: anyio.Event | None,
    ledger: Ledger,
    shutdown: Shutdown,
    counters: Counters,
) -> None:
    """Hand the settler what no stage finished, let it drain its stream, and let the
    ledger resolve this daemon's open claims: shielded, and bounded by ``settle_by``."""
    with anyio.CancelScope(shield=True, deadline=shutdown.settle_by) as scope:
        not_started = list(ready(streams.restarts[1]))
        counters.restart_cancelled += len(not_started)
        for claimed in not_started:
            finish = Finish(claimed.claim, Outcome.CANCELLED,
                            NOT_STARTED_DETAIL.format(why=SHUTTING_DOWN), Reason.NOT_STARTED)
            outbox.settle(claimed.delivery, Settlement.NACK, finish)
        for letter in ready(streams.letters[1]):
            outbox.settle(letter.delivery, Settlement.NACK, letter.finish)
        held = holdings.release_all()
        for delivery in held:
            outbox.settle(delivery, Settlement.NACK)
        streams.close()
        outbox.close()
        if held or not_started:
            log.info("handing back %d messages still held at shutdown",
                     len(held) + len(not_started))
        if settled is not None:
            await settled.wait()
        try:
            await ledger.stop()
        except Exception as exc:
            log.error("could not record this daemon's stop in the ledger: %s; its open"
                      " claims are resolved by its peers once its heartbeat ages", exc)
    if scope.cancelled_caught:
        log.error(
            "final settlement cut short by its deadline: %d settlements not sent; the"
            " source redelivers those messages when their leases expire", settler.pending,
        )
