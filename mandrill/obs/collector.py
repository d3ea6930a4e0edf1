"""The Prometheus view of :class:`~mandrill.obs.counters.Counters`, built at scrape time.

The hot path only increments plain integers; :class:`CountersCollector` turns them into
metric families when Prometheus scrapes, on the loop thread, so nothing is locked or copied
per message. Each daemon gets its own ``CollectorRegistry`` (:func:`build_registry`): no
global state, so tests can run many.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import sniffio
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from mandrill.blockers import BLOCKER_NAMES
from mandrill.obs.counters import Counters, Histogram
from mandrill.obs.health import Health
from mandrill.policy import DEAD_LETTER_REASONS, SKIP_REASONS
from mandrill.version import version

if TYPE_CHECKING:
    from mandrill.obs.lag import LagProbe


class ProcessCollectorWithoutProcStat(ProcessCollector):
    """prometheus_client's process collector, which reads the boot time from /proc/stat
    and exports nothing when it cannot: under systemd's ``ProcSubset=pid`` (the unit's
    hardening) /proc holds processes only. Then the boot time comes from the clocks."""

    def _boot_time(self) -> float:
        try:
            found: float | None = super()._boot_time()  # type: ignore[no-untyped-call]
        except OSError:
            found = None
        if found is None:
            return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return found


class CountersCollector:
    """Reads :class:`Counters` at scrape time; call ``collect`` on the loop thread."""

    def __init__(
        self,
        counters: Counters,
        *,
        in_flight: Callable[[], int],
        in_flight_limit: int | None = None,
        probe: LagProbe | None = None,
        health: Health | None = None,
        breaker_open: Callable[[], bool] | None = None,
        backend: str | None = None,
    ) -> None:
        self._counters = counters
        self._breaker_open = breaker_open
        self._backend = backend
        self._in_flight = in_flight
        self._in_flight_limit = in_flight_limit
        self._probe = probe
        self._health = health

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        yield self._build_info()
        yield _counter("messages_received", "Deliveries taken by workers.", c.received)
        yield _counter("messages_acked", "Acks queued (done, duplicate, dead-lettered).", c.acked)
        yield _counter("messages_nacked", "Nacks queued: redelivered by the source.", c.nacked)
        yield _counter_by(
            "messages_dead_lettered", "Messages dead-lettered, by reason.", "reason",
            c.dead_letter_reasons, known=DEAD_LETTER_REASONS,
        )
        yield _counter(
            "dead_letter_failures",
            "Dead letters that could not be published (the message was nacked instead).",
            c.dead_letter_failures,
        )
        yield _counter_by(
            "restarts", "Restart decisions carried out, by outcome.", "outcome",
            {"restarted": c.restarted, "failed": c.restart_failed, "dry_run": c.dry_run,
             "unknown": c.restart_unknown, "cancelled": c.restart_cancelled},
        )
        yield _counter_by("messages_skipped", "Messages skipped, by reason.", "reason",
                          c.skip_reasons, known=SKIP_REASONS)
        yield _counter_by(
            "restarts_blocked",
            "Restarts a blocker held back just before they began (deferred), by blocker.",
            "blocker", c.blocked, known=BLOCKER_NAMES,
        )
        yield _counter_by(
            "blocker_errors",
            "Restarts held back because a blocker could not tell (it fails closed).",
            "blocker", c.blocker_errors, known=BLOCKER_NAMES,
        )
        yield _counter("duplicates", "Redeliveries of already handled messages.", c.duplicates)
        yield _counter(
            "message_id_conflicts",
            "Messages whose id the ledger held for another message: decided as new.",
            c.message_id_conflicts,
        )
        yield _counter("save_failures", "Messages the ledger failed to save.", c.save_failed)
        yield _counter("ledger_unavailable", "Decisions nacked: ledger unreachable.",
                       c.ledger_unavailable)
        yield _counter("handling_errors", "Unexpected errors handling a message (bugs).",
                       c.errors)
        yield _counter("lease_extensions", "Ack deadlines extended.", c.lease_extensions)
        yield _counter("leases_abandoned", "Messages held past --max-lease, let go.",
                       c.leases_abandoned)
        yield _counter("source_pull_errors", "Failed pull requests (retried or not).",
                       c.pull_errors)
        yield _counter_by(
            "notifications",
            "Notifications (--notify-url): delivered, given up on, dropped unsent.", "result",
            {"sent": c.notifications_sent, "failed": c.notifications_failed,
             "dropped": c.notifications_dropped},
        )
        yield _gauge("messages_in_flight", "Deliveries held now.", self._in_flight())
        if self._in_flight_limit is not None:
            yield _gauge("messages_in_flight_limit", "--max-in-flight: deliveries held at most.",
                         self._in_flight_limit)
        yield _histogram(
            "message_latency_seconds",
            "Publish time to final settlement (ack or dead-letter), wall clock.",
            c.latency,
        )
        yield _histogram(
            "restart_duration_seconds", "Duration of restarter calls (done or failed).",
            c.restart_duration,
        )
        if self._probe is not None:
            probe = self._probe
            yield _gauge("event_loop_lag_seconds", "Oversleep of the last lag-probe beat.",
                         probe.latest)
            yield _gauge("event_loop_lag_max_seconds", "Largest lag in the last minute.",
                         probe.max_lag)
            yield _counter("event_loop_stalls", "Steps that held the loop too long.",
                           probe.stalls_total)
        if self._health is not None:
            ready, _ = self._health.ready()
            yield _gauge("ready", "1 when /readyz answers 200.", float(ready))
        if self._breaker_open is not None:
            yield _gauge(
                "breaker_open",
                "1 while the fleet's restart-storm breaker is open (no restart until"
                " `mandrill resume`), as this daemon last read the ledger.",
                float(self._breaker_open()),
            )

    def _build_info(self) -> Metric:
        backend = self._backend
        if backend is None:
            try:
                backend = sniffio.current_async_library()
            except sniffio.AsyncLibraryNotFoundError:  # read outside the event loop
                backend = "unknown"
        family = GaugeMetricFamily(
            _name("build_info"), "Always 1: what runs, in its labels.",
            labels=["version", "backend", "python"],
        )
        family.add_metric([version(), backend, platform.python_version()], 1)
        return family


def build_registry(
    counters: Counters,
    *,
    in_flight: Callable[[], int],
    in_flight_limit: int | None = None,
    probe: LagProbe | None = None,
    health: Health | None = None,
    breaker_open: Callable[[], bool] | None = None,
    backend: str | None = None,
) -> CollectorRegistry:
    """A fresh registry (never the global one) holding one :class:`CountersCollector` and
    prometheus_client's process (``process_*``: CPU, memory, open files), platform
    (``python_info``) and garbage collector (``python_gc_*``) collectors. ``backend`` is
    ``mandrill_build_info``'s label (else the backend running the scrape)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CountersCollector(
        counters, in_flight=in_flight, in_flight_limit=in_flight_limit, probe=probe,
        health=health, breaker_open=breaker_open, backend=backend,
    ))
    ProcessCollectorWithoutProcStat(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _name(name: str) -> str:
    return f"mandrill_{name}"


def _counter(name: str, documentation: str, value: float) -> Metric:
    return CounterMetricFamily(_name(name), documentation, value=value)


def _counter_by(
    name: str,
    documentation: str,
    label: str,
    values: Mapping[str, int],
    known: Iterable[str] = (),
) -> Metric:
    """A counter per label value; every ``known`` value has a series from the start (at 0),
    so that a dashboard or an alert's rate() sees 0 rather than no data."""
    family = CounterMetricFamily(_name(name), documentation, labels=[label])
    for key, value in sorted({**dict.fromkeys(known, 0), **values}.items()):
        family.add_metric([key], value)
    return family


def _gauge(name: str, documentation: str, value: float) -> Metric:
    return GaugeMetricFamily(_name(name), documentation, value=value)


def _histogram(name: str, documentation: str, histogram: Histogram) -> Metric:
    buckets = [
        ("+Inf" if math.isinf(bound) else repr(bound), count)
        for bound, count in histogram.cumulative()
    ]
    return HistogramMetricFamily(
        _name(name), documentation, buckets=buckets, sum_value=histogram.sum
    )
