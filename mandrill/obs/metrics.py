"""Prometheus metrics, ``/healthz`` and ``/readyz``, served by the service's own task tree.

The hot path only increments plain integers in :class:`~mandrill.obs.counters.Counters`;
:class:`CountersCollector` turns them into metric families when Prometheus scrapes, on
the loop thread, so nothing is locked or copied per message. Each service gets its own
``CollectorRegistry`` (:func:`build_registry`): no global state, so tests can run many.

The HTTP server is a few dozen lines on anyio's own sockets rather than
prometheus-client's threaded server: it runs as a task of the service's task group (on
asyncio and trio alike), so no thread outlives the service and shutdown cancels it like
everything else. It speaks just enough HTTP/1.1: ``GET`` only, one request per
connection (``Connection: close``), a bounded request head, a deadline per connection and
a bound on concurrent connections.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskStatus
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from mandrill.errors import ConfigError
from mandrill.obs.counters import DEAD_LETTER_LABELS, OTHER, SKIP_LABELS, Counters, Histogram
from mandrill.obs.debug import watch_slow_steps
from mandrill.obs.lag import DEFAULT_SLOW_CALLBACK_MS, LagProbe
from mandrill.obs.taskdump import dump_tasks_on_signal

if TYPE_CHECKING:
    from mandrill.shutdown import Shutdown

log = logging.getLogger(__name__)

DEFAULT_ADDR = "127.0.0.1:9464"
#: Request line plus headers; a scraper sends a few hundred bytes.
MAX_REQUEST_BYTES = 8192
#: From accept to the last byte sent; a scrape answers in milliseconds.
CONNECTION_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
#: ``/healthz`` fails when the lag probe has not woken up for this long past its interval.
LIVENESS_BOUND = 5.0

_PORT = re.compile(r"^\d{1,5}$")

#: The reason labels that have a series from the start.
SKIP_REASONS = (*(label for _, label in SKIP_LABELS), OTHER)
DEAD_LETTER_REASONS = (*(label for _, label in DEAD_LETTER_LABELS), OTHER)


def parse_addr(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"localhost:9464"``, ``"[::1]:9464"`` → ``(host, port)``.

    Raises ``ValueError`` with a one-line reason. A host is required: listening on every
    interface takes an explicit ``0.0.0.0:PORT`` or ``[::]:PORT``.
    """
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":") or ":" not in host:
            raise ValueError(f"{text!r} is not [IPv6]:PORT (example: [::1]:9464)")
        port = rest[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} has no port (example: 127.0.0.1:9464)")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, as in [::1]:9464")
    if not host:
        raise ValueError(f"{text!r} has no host (use 127.0.0.1:PORT, or 0.0.0.0:PORT for all)")
    if not _PORT.match(port) or int(port) > 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    if any(char.isspace() or char in "/?#@" for char in host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    return host, int(port)


class Health(Protocol):
    """What ``/healthz`` and ``/readyz`` ask; each answer is ``(ok, reason)``."""

    def loop_alive(self) -> tuple[bool, str]: ...

    def ready(self) -> tuple[bool, str]: ...


@dataclass
class ServiceHealth:
    """Liveness from the lag probe, readiness from the service's parts.

    ``ready()`` is true once :meth:`set_serving` was called, while every check in
    ``checks`` (for example ``{"source": ..., "ledger": ...}``) returns true and no
    shutdown has been requested. Checks run on the loop thread at each request: keep them
    to attribute reads.
    """

    shutdown: Shutdown | None = None
    probe: LagProbe | None = None
    checks: Mapping[str, Callable[[], bool]] = field(default_factory=dict)
    liveness_bound: float = LIVENESS_BOUND
    serving: bool = False

    def set_serving(self) -> None:
        """Called by ``serve()`` once every part runs and workers take messages."""
        self.serving = True

    def loop_alive(self) -> tuple[bool, str]:
        if self.probe is None:
            return True, "ok"
        age = self.probe.beat_age()
        if self.probe.alive(self.liveness_bound):
            return True, "ok"
        return False, f"event loop lagging: last lag-probe beat {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        if self.shutdown is not None and self.shutdown.requested.is_set():
            return False, f"shutting down ({self.shutdown.reason or 'requested'})"
        if not self.serving:
            return False, "starting"
        for name, check in self.checks.items():
            if not check():
                return False, f"{name} not ready"
        return True, "ready"


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
    ) -> None:
        self._counters = counters
        self._in_flight = in_flight
        self._in_flight_limit = in_flight_limit
        self._probe = probe
        self._health = health

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        yield _counter("messages_received", "Deliveries taken by workers.", c.received)
        yield _counter("messages_acked", "Acks queued (done, duplicate, dead-lettered).", c.acked)
        yield _counter("messages_nacked", "Nacks queued: redelivered by the source.", c.nacked)
        yield _counter_by(
            "messages_dead_lettered", "Messages dead-lettered, by reason.", "reason",
            c.dead_letter_reasons, known=DEAD_LETTER_REASONS,
        )
        yield _counter_by(
            "restarts", "Restart decisions carried out, by outcome.", "outcome",
            {"restarted": c.restarted, "failed": c.restart_failed, "dry_run": c.dry_run},
        )
        yield _counter_by("messages_skipped", "Messages skipped, by reason.", "reason",
                          c.skip_reasons, known=SKIP_REASONS)
        yield _counter("duplicates", "Redeliveries of already handled messages.", c.duplicates)
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


def build_registry(
    counters: Counters,
    *,
    in_flight: Callable[[], int],
    in_flight_limit: int | None = None,
    probe: LagProbe | None = None,
    health: Health | None = None,
) -> CollectorRegistry:
    """A fresh registry (never the global one) holding one :class:`CountersCollector` and
    prometheus_client's process (``process_*``: CPU, memory, open files), platform
    (``python_info``) and garbage collector (``python_gc_*``) collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CountersCollector(
        counters, in_flight=in_flight, in_flight_limit=in_flight_limit, probe=probe, health=health
    ))
    ProcessCollector(registry=registry)
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


# --- the HTTP server -------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


_PHRASES = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


async def serve_http(
    addr: str,
    registry: CollectorRegistry,
    health: Health,
    *,
    connection_timeout: float = CONNECTION_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``addr`` until cancelled.

    Reports the bound port through ``task_status`` (so ``HOST:0`` picks a free one).
    Raises ``ValueError`` for a bad ``addr`` and ``ConfigError`` if it cannot listen (the
    port is taken), both before ``started``. A connection's failure (a client gone, a
    timeout, a bug rendering a page) ends that connection only; connections beyond
    ``max_connections`` are closed at once.
    """
    host, port = parse_addr(addr)
    limiter = anyio.CapacityLimiter(max_connections)
    handler = partial(_handle, registry=registry, health=health, limiter=limiter,
                      connection_timeout=connection_timeout)
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigError(f"--metrics-addr {addr}: cannot listen: {exc.strerror or exc}") from exc
    async with listener:
        bound = listener.extra(SocketAttribute.local_port)
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", shown, bound)
        task_status.started(bound)
        await listener.serve(handler)


async def _handle(
    stream: ByteStream,
    *,
    registry: CollectorRegistry,
    health: Health,
    limiter: anyio.CapacityLimiter,
    connection_timeout: float,
) -> None:
    async with stream:
        try:
            limiter.acquire_on_behalf_of_nowait(stream)
        except anyio.WouldBlock:
            log.debug("metrics: too many connections, closing one")
            return
        try:
            with anyio.move_on_after(connection_timeout):
                response = await _respond(stream, registry, health)
                if response is not None:
                    await stream.send(_encode(response))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("metrics: connection lost: %r", exc)
        finally:
            limiter.release_on_behalf_of(stream)


async def _respond(
    stream: ByteStream, registry: CollectorRegistry, health: Health
) -> _Response | None:
    """Read one request and build its response; ``None`` when the client went away."""
    try:
        head = await _read_head(stream)
    except anyio.EndOfStream:
        return None
    except _BadRequest as exc:
        return _Response(exc.status, f"{exc}\n".encode())
    try:
        method, path, headers = _parse_head(head)
        if method != "GET":
            return _Response(405, b"only GET\n", headers=(("Allow", "GET"),))
        return _route(path, headers, registry, health)
    except _BadRequest as exc:
        return _Response(exc.status, f"{exc}\n".encode())
    except Exception:
        # One page failing (a collector's bug) must not stop the server nor the service.
        log.exception("metrics: error answering a request")
        return _Response(500, b"internal error\n")


async def _read_head(stream: ByteStream) -> bytes:
    """Bytes up to the blank line ending the headers. Raises ``EndOfStream``/_BadRequest."""
    data = bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            end = data.find(b"\n\n")
        if end >= 0:
            return bytes(data[:end])
        if len(data) > MAX_REQUEST_BYTES:
            raise _BadRequest(431, "request head too large")
        chunk = await stream.receive(4096)
        data += chunk


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise _BadRequest(505, "HTTP/1.x only")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


def _route(
    path: str, headers: Mapping[str, str], registry: CollectorRegistry, health: Health
) -> _Response:
    if path == "/metrics":
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return _Response(200, encoder(registry), content_type)
    if path in ("/healthz", "/readyz"):
        ok, reason = health.loop_alive() if path == "/healthz" else health.ready()
        return _Response(200 if ok else 503, f"{reason}\n".encode())
    return _Response(404, b"not found: try /metrics, /healthz or /readyz\n")


def _encode(response: _Response) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, '')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        "Cache-Control: no-store",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


def metrics_service(
    addr: str,
    counters: Counters,
    *,
    in_flight: Callable[[], int],
    health: Health,
    in_flight_limit: int | None = None,
    probe: LagProbe | None = None,
) -> Callable[..., Any]:
    """A service for ``root.start``: a fresh registry over ``counters`` and its server."""
    registry = build_registry(counters, in_flight=in_flight, in_flight_limit=in_flight_limit,
                              probe=probe, health=health)
    return partial(serve_http, addr, registry, health)


@dataclass
class Observability:
    """Everything ``run`` turns on to watch the daemon, built once from the configuration.

    ``serve()`` starts :meth:`services` in its root task group (it owns what ``in_flight``
    counts) and calls ``health.set_serving()`` once workers take messages.
    """

    counters: Counters
    shutdown: Shutdown
    metrics_addr: str | None = None
    #: Watchdog threshold; ``None`` or 0 turns the watchdog thread off.
    slow_callback_ms: float | None = DEFAULT_SLOW_CALLBACK_MS
    debug: bool = False
    #: ``--max-in-flight``, exported so that an alert can compare the in-flight gauge to it.
    max_in_flight: int | None = None
    #: SIGUSR1 dumps the task tree.
    task_dump: bool = True
    probe: LagProbe = field(init=False)
    health: ServiceHealth = field(init=False)

    def __post_init__(self) -> None:
        self.probe = LagProbe(slow_callback_ms=self.slow_callback_ms)
        self.health = ServiceHealth(shutdown=self.shutdown, probe=self.probe)

    def services(self, *, in_flight: Callable[[], int]) -> list[tuple[str, Callable[..., Any]]]:
        """``(task name, service)`` pairs, each to be started with ``root.start``."""
        found: list[tuple[str, Callable[..., Any]]] = [("lag probe", self.probe.run)]
        if self.task_dump:
            found.append(("task dump", dump_tasks_on_signal))
        if self.debug and self.slow_callback_ms:
            found.append(("slow steps", partial(watch_slow_steps, self.slow_callback_ms)))
        if self.metrics_addr is not None:
            found.append((
                "metrics server",
                metrics_service(self.metrics_addr, self.counters, in_flight=in_flight,
                                in_flight_limit=self.max_in_flight, health=self.health,
                                probe=self.probe),
            ))
        return found
