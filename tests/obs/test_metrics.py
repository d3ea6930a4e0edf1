"""The metrics collector and the /metrics, /healthz, /readyz server, scraped over real HTTP."""

from __future__ import annotations

import socket
import time
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mandrill.obs.address import parse_addr
from mandrill.obs.collector import build_registry
from mandrill.obs.counters import Counters, Histogram
from mandrill.obs.health import ServiceHealth
from mandrill.obs.http import serve_http
from mandrill.obs.lag import LagProbe
from mandrill.obs.metrics import Observability
from mandrill.shutdown import Shutdown


async def fetch(
    port: int, raw: bytes, host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` as is; return status, headers and body of the reply (read to EOF)."""
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(raw)
        data = bytearray()
        try:
            while True:
                data += await stream.receive()
        except anyio.EndOfStream:
            pass
    if not data:
        return 0, {}, b""
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(status_line.split(" ")[1]), headers, body


async def get(port: int, path: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    lines = [f"GET {path} HTTP/1.1", "Host: test", *extra, "", ""]
    return await fetch(port, "\r\n".join(lines).encode())


@asynccontextmanager
async def running(registry, health, addr="127.0.0.1:0", **options):
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve_http, addr, registry, health, **options))
        yield port
        tg.cancel_scope.cancel()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def fill(counters: Counters) -> None:
    counters.received = 12
    counters.acked = 8
    counters.nacked = 3
    counters.dead_lettered = 2
    counters.dead_letter_reasons.update({"invalid": 1, "max_attempts": 1})
    counters.restarted = 4
    counters.restart_failed = 2
    counters.dry_run = 1
    counters.skipped = 2
    counters.skip_reasons.update({"interval": 2})
    counters.blocked.update({"alerts": 3, "command": 1})
    counters.blocker_errors.update({"alerts": 2})
    counters.duplicates = 1
    counters.message_id_conflicts = 3
    counters.save_failed = 1
    counters.lease_extensions = 30
    counters.pull_errors = 5
    counters.latency.observe(0.02)
    counters.latency.observe(4.0)
    counters.restart_duration.observe(0.3)


async def test_scrape_reports_what_was_counted():
    counters = Counters()
    fill(counters)
    shutdown = Shutdown()
    probe = LagProbe(interval=0.01, slow_callback_ms=None)
    health = ServiceHealth(shutdown=shutdown, probe=probe)
    registry = build_registry(counters, in_flight=lambda: 7, probe=probe, health=health)
    async with anyio.create_task_group() as tg:
        await tg.start(probe.run)
        async with running(registry, health) as port:
            status, headers, body = await get(port, "/metrics")
            assert status == 200
            assert headers["content-type"].startswith("text/plain")
            found = samples(body.decode())

            def value(name: str, **labels: str) -> float:
                return found[(name, tuple(sorted(labels.items())))]

            assert value("mandrill_messages_received_total") == 12
            assert value("mandrill_messages_acked_total") == 8
            assert value("mandrill_messages_nacked_total") == 3
            assert value("mandrill_messages_dead_lettered_total", reason="invalid") == 1
            assert value("mandrill_messages_dead_lettered_total",
                         reason="max_attempts") == 1
            assert value("mandrill_restarts_total", outcome="restarted") == 4
            assert value("mandrill_restarts_total", outcome="failed") == 2
            assert value("mandrill_restarts_total", outcome="dry_run") == 1
            assert value("mandrill_messages_skipped_total", reason="interval") == 2
            assert value("mandrill_restarts_blocked_total", blocker="alerts") == 3
            assert value("mandrill_restarts_blocked_total", blocker="command") == 1
            assert value("mandrill_blocker_errors_total", blocker="alerts") == 2
            assert value("mandrill_blocker_errors_total", blocker="command") == 0
            assert value("mandrill_duplicates_total") == 1
            assert value("mandrill_message_id_conflicts_total") == 3
            assert value("mandrill_save_failures_total") == 1
            assert value("mandrill_lease_extensions_total") == 30
            assert value("mandrill_source_pull_errors_total") == 5
            assert value("mandrill_messages_in_flight") == 7
            assert value("mandrill_message_latency_seconds_count") == 2
            assert value("mandrill_message_latency_seconds_sum") == pytest.approx(4.02)
            assert value("mandrill_message_latency_seconds_bucket", le="0.025") == 1
            assert value("mandrill_message_latency_seconds_bucket", le="5.0") == 2
            assert value("mandrill_message_latency_seconds_bucket", le="+Inf") == 2
            assert value("mandrill_restart_duration_seconds_bucket", le="0.25") == 0
            assert value("mandrill_restart_duration_seconds_bucket", le="0.5") == 1
            assert value("mandrill_event_loop_lag_seconds") >= 0
            assert value("mandrill_event_loop_lag_max_seconds") >= 0
            assert value("mandrill_event_loop_stalls_total") == 0
            assert value("mandrill_ready") == 0  # not serving yet

            # Read at scrape time: later increments show in the next scrape.
            counters.received += 1
            counters.dead_letter_reasons["invalid"] += 1
            health.set_serving()
            found = samples((await get(port, "/metrics"))[2].decode())
            assert value("mandrill_messages_received_total") == 13
            assert value("mandrill_messages_dead_lettered_total", reason="invalid") == 2
            assert value("mandrill_ready") == 1
        tg.cancel_scope.cancel()


def test_the_breaker_gauge_reads_the_ledgers_last_word():
    state = {"open": False}

    def gauge(registry) -> float | None:
        return registry.get_sample_value("mandrill_breaker_open")

    registry = build_registry(Counters(), in_flight=lambda: 0,
                              breaker_open=lambda: state["open"])
    assert gauge(registry) == 0
    state["open"] = True
    assert gauge(registry) == 1
    assert gauge(build_registry(Counters(), in_flight=lambda: 0)) is None


async def test_openmetrics_when_asked():
    registry = build_registry(Counters(), in_flight=lambda: 0)
    async with running(registry, ServiceHealth()) as port:
        status, headers, body = await get(port, "/metrics",
                                          "Accept: application/openmetrics-text")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_readyz_until_shutdown_then_503_with_the_reason():
    shutdown = Shutdown()
    source_problem: str | None = None
    health = ServiceHealth(shutdown=shutdown, checks={"source": lambda: source_problem})
    registry = build_registry(Counters(), in_flight=lambda: 0, health=health)
    async with running(registry, health) as port:
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (503, b"starting\n")
        health.set_serving()
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        source_problem = "pulls failing for 12s: HTTP 503"
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (503, b"source not ready: pulls failing for 12s: HTTP 503\n")
        source_problem = None
        shutdown.request("SIGTERM")
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (503, b"shutting down (SIGTERM)\n")
        # Liveness is not readiness: a stopping daemon is still alive.
        status, _, body = await get(port, "/healthz")
        assert (status, body) == (200, b"ok\n")


async def test_while_starting_readyz_gives_the_reason_a_part_is_not_ready():
    """A source that cannot be reached at start says so before ``starting``; the ledger's
    check, added by set_serving, joins it."""
    source_problem: str | None = "get subscription s: refused (failing for 3s)"
    health = ServiceHealth()
    health.add_checks({"source": lambda: source_problem})
    assert health.ready() == (False, "source not ready: get subscription s: refused"
                                     " (failing for 3s)")
    source_problem = None
    assert health.ready() == (False, "starting")
    health.set_serving({"ledger": lambda: "down"})
    assert health.ready() == (False, "ledger not ready: down")
    assert set(health.checks) == {"source", "ledger"}


async def test_healthz_fails_when_the_loop_stops_answering():
    probe = LagProbe(interval=0.01, slow_callback_ms=None)
    health = ServiceHealth(probe=probe, liveness_bound=0.05)
    assert health.loop_alive() == (True, "ok")  # probe not running: nothing to judge
    async with anyio.create_task_group() as tg:
        await tg.start(probe.run)
        assert health.loop_alive() == (True, "ok")
        # The HTTP handler runs on the loop too, so a blocked loop cannot answer at all;
        # ask the health object directly, from inside the stall.
        time.sleep(0.2)  # noqa: ASYNC251 - deliberately blocking the loop
        alive, reason = health.loop_alive()
        assert not alive
        assert reason.startswith("event loop lagging")
        tg.cancel_scope.cancel()


async def test_http_errors():
    registry = build_registry(Counters(), in_flight=lambda: 0)
    async with running(registry, ServiceHealth(), connection_timeout=0.2) as port:
        status, headers, _ = await fetch(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, headers["allow"]) == (405, "GET")
        assert (await get(port, "/nope"))[0] == 404
        assert (await get(port, "/metrics?x=1"))[0] == 200
        assert (await fetch(port, b"GARBAGE\r\n\r\n"))[0] == 400
        assert (await fetch(port, b"GET / SPDY/3\r\n\r\n"))[0] == 505
        assert (await fetch(port, b"GET / HTTP/1.1\r\nno colon\r\n\r\n"))[0] == 400
        assert (await fetch(port, b"GET /" + b"a" * 9000))[0] == 431
        # A client that sends nothing is dropped after the connection timeout.
        with anyio.fail_after(5):
            assert await fetch(port, b"") == (0, {}, b"")
        # And the server still answers afterwards.
        assert (await get(port, "/healthz"))[0] == 200


async def test_connections_beyond_the_limit_are_closed():
    registry = build_registry(Counters(), in_flight=lambda: 0)
    async with running(registry, ServiceHealth(), max_connections=1) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as idle:
            await idle.send(b"GET /healthz HTTP/1.1\r\n")  # incomplete: holds its slot
            with anyio.fail_after(5):
                assert await get(port, "/healthz") == (0, {}, b"")
            await idle.send(b"\r\n")
            assert (await idle.receive()).startswith(b"HTTP/1.1 200 OK")
        assert (await get(port, "/healthz"))[0] == 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9464", ("::1", 9464)),
        (" 0.0.0.0:80 ", ("0.0.0.0", 80)),
    ],
)
def test_parse_addr(text, expected):
    assert parse_addr(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "9464", ":9464", "localhost", "::1:9464", "[::1]", "[::1]9464", "[127.0.0.1]:80",
     "127.0.0.1:70000", "127.0.0.1:http", "127.0.0.1:-1", "a b:80", "http://x:80"],
)
def test_bad_addr_is_one_line_value_error(text):
    with pytest.raises(ValueError, match=r"^[^\n]+$"):
        parse_addr(text)


async def test_bad_addr_fails_the_service_start():
    registry = build_registry(Counters(), in_flight=lambda: 0)
    with pytest.raises(ValueError, match="no port"):
        await serve_http("localhost", registry, ServiceHealth())


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
async def test_serves_on_ipv6():
    registry = build_registry(Counters(), in_flight=lambda: 0)
    async with running(registry, ServiceHealth(), addr="[::1]:0") as port:
        status, _, body = await fetch(port, b"GET /healthz HTTP/1.1\r\n\r\n", host="::1")
    assert (status, body) == (200, b"ok\n")


def test_histogram_buckets_are_upper_inclusive():
    histogram = Histogram([0.1, 1.0])
    for value in (0.1, 0.5, 1.0, 2.0, -3.0):
        histogram.observe(value)
    assert histogram.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert histogram.sum == pytest.approx(3.6)
    with pytest.raises(ValueError, match="ascending"):
        Histogram([1.0, 0.5])


async def test_observability_bundle_runs_every_probe():
    counters = Counters()
    shutdown = Shutdown()
    obs = Observability(counters, shutdown, metrics_addr="127.0.0.1:0", debug=True)
    tasks = obs.probes(in_flight=lambda: 3)
    assert [name for name, _ in tasks] == [
        "lag probe", "task dump", "slow steps", "metrics server"
    ]
    async with anyio.create_task_group() as tg:
        started = {name: await tg.start(task, name=name) for name, task in tasks}
        port = started["metrics server"]
        assert (await get(port, "/readyz"))[2] == b"starting\n"
        obs.health.set_serving()
        counters.received += 2
        body = (await get(port, "/metrics"))[2]
        found = samples(body.decode())
        assert found[("mandrill_messages_received_total", ())] == 2
        assert found[("mandrill_messages_in_flight", ())] == 3
        assert found[("mandrill_ready", ())] == 1
        shutdown.request("test")
        assert (await get(port, "/readyz"))[0] == 503
        tg.cancel_scope.cancel()


def test_the_labels_of_skips_are_the_codes_the_decisions_carry():
    """Every skip the policy and the safety controls decide carries one of the codes the
    counter knows: the label comes from the code, never from the sentence."""
    from datetime import UTC, datetime

    from mandrill.policy import SKIP_REASONS, Prior, RateLimit, Rules, Verdict, decide_restart
    from mandrill.safety import TimeWindow, host_skip_reason, parse_hours, parse_weekdays
    from tests.ledger import message

    interval = decide_restart(Prior(host_last_restart=0.0), 60.0, Rules(3600.0))
    fleet = decide_restart(Prior(fleet_restarts=3), 60.0, Rules(3600.0, RateLimit(3, 60.0)))
    assert Verdict.SKIP == interval.verdict == fleet.verdict
    sunday_night = datetime(2026, 11, 29, 23, 0, tzinfo=UTC)
    refusals = [
        host_skip_reason(message("m", "web-1"), exclude=["web-*"]),
        host_skip_reason(message("m", "web-1"), only=["db-*"]),
        TimeWindow(parse_weekdays("mon-fri")).skip_reason(sunday_night),
        TimeWindow(hours=parse_hours("09:00-17:00")).skip_reason(sunday_night),
        TimeWindow(skip_dates=frozenset({sunday_night.date()})).skip_reason(sunday_night),
    ]
    codes = [interval.reason, fleet.reason, *(r.reason for r in refusals if r is not None)]
    assert sorted(codes) == sorted(SKIP_REASONS)


async def test_a_fresh_daemon_has_every_series_and_the_process_metrics():
    registry = build_registry(Counters(), in_flight=lambda: 0)
    async with running(registry, ServiceHealth()) as port:
        found = samples((await get(port, "/metrics"))[2].decode())
    for reason in ("interval", "excluded", "not_allowed", "outside_days", "outside_hours",
                   "rate_limit"):
        assert found[("mandrill_messages_skipped_total", (("reason", reason),))] == 0
    for reason in ("invalid", "max_attempts"):
        assert found[("mandrill_messages_dead_lettered_total", (("reason", reason),))] == 0
    for outcome in ("restarted", "failed", "dry_run", "unknown", "cancelled"):
        assert found[("mandrill_restarts_total", (("outcome", outcome),))] == 0
    for blocker in ("alerts", "command"):
        assert found[("mandrill_restarts_blocked_total", (("blocker", blocker),))] == 0
        assert found[("mandrill_blocker_errors_total", (("blocker", blocker),))] == 0
    names = {name for name, _ in found}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total",
            "process_open_fds", "python_gc_objects_collected_total"} <= names
    assert any(name == "python_info" for name, _ in found)
    assert found[("mandrill_dead_letter_failures_total", ())] == 0
    for result in ("sent", "failed", "dropped"):
        assert found[("mandrill_notifications_total", (("result", result),))] == 0


async def test_build_info_names_the_version_the_backend_and_python(anyio_backend):
    import platform

    from mandrill.version import version

    def build_info(**options: str) -> dict[str, str]:
        registry = build_registry(Counters(), in_flight=lambda: 0, **options)
        (family,) = [f for f in registry.collect() if f.name == "mandrill_build_info"]
        (sample,) = family.samples
        assert sample.value == 1
        return sample.labels

    running = build_info()  # not told: the backend running the scrape
    assert running == {"version": version(), "backend": anyio_backend[0],
                       "python": platform.python_version()}
    assert build_info(backend="trio")["backend"] == "trio"


def test_process_metrics_without_proc_stat(tmp_path):
    """Under the unit's ProcSubset=pid, /proc has no stat file: prometheus_client's process
    collector would export nothing; mandrill's takes the boot time from the clocks."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    from mandrill.obs.collector import ProcessCollectorWithoutProcStat

    (tmp_path / "self").symlink_to("/proc/self")

    def collected(collector_type: type[ProcessCollector], proc: str) -> dict[str, float]:
        registry = CollectorRegistry(auto_describe=False)
        collector_type(proc=proc, registry=registry)
        return {s.name: s.value for family in registry.collect() for s in family.samples}

    assert collected(ProcessCollector, str(tmp_path)) == {}  # why the subclass exists
    pid_only = collected(ProcessCollectorWithoutProcStat, str(tmp_path))
    full = collected(ProcessCollectorWithoutProcStat, "/proc")
    assert pid_only["process_resident_memory_bytes"] > 0
    # /proc/stat's boot time is whole seconds.
    assert abs(pid_only["process_start_time_seconds"] - full["process_start_time_seconds"]) < 2


async def test_probes_run_before_serve_and_read_what_it_holds_once_it_does():
    """run() starts the probes before the parts open (Pub/Sub unreachable at start):
    they answer then, and serve() leaves them running, pointing the gauge at its holdings."""
    obs = Observability(Counters(), Shutdown(), metrics_addr="127.0.0.1:0")
    async with obs.running() as port:
        assert obs.started
        status, _, body = await get(port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert (await get(port, "/readyz"))[2] == b"starting\n"
        found = samples((await get(port, "/metrics"))[2].decode())
        assert (found[("mandrill_messages_in_flight", ())], found[("mandrill_ready", ())]) == (0, 0)
        obs.count_in_flight(lambda: 5)
        found = samples((await get(port, "/metrics"))[2].decode())
        assert found[("mandrill_messages_in_flight", ())] == 5
    assert not obs.started
