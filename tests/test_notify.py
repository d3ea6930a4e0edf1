"""The notifier against a real HTTP receiver on 127.0.0.1 (a stdlib server in a thread), and
the notification settings through the CLI."""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

import anyio
import pytest

from mandrill import config
from mandrill.ledger import open_ledger
from mandrill.notification import BodyTemplate, Notification, parse_headers
from mandrill.notify import Notifier
from mandrill.parts import add_notifier
from mandrill.retry import RetryPolicy
from mandrill.service import Parts, ServiceSettings, serve
from mandrill.shutdown import Shutdown
from mandrill.sources.memory import MemoryBroker
from mandrill.worker import WorkerSettings
from tests.support.daemon import run_to_end
from tests.support.fakes import ScriptedRestarter, payloads
from tests.support.net import free_port

TIME = datetime(2026, 1, 5, 12, 0, 30, tzinfo=timezone(timedelta(hours=1)))
#: Retries without waiting to speak of.
QUICK = RetryPolicy(initial=0.01, cap=0.01, total=10, attempts=5)


def quick(attempts: int) -> RetryPolicy:
    return RetryPolicy(initial=0.01, cap=0.01, total=10, attempts=attempts)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    document: object
    #: The client's port: one per connection.
    port: int


@dataclass
class Receiver:
    url: str = ""
    #: Answers to the next requests, in order (a status, or a status and a body); 200 once
    #: they run out.
    statuses: list[int | tuple[int, bytes]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    #: While clear, requests are held without an answer.
    release: threading.Event = field(default_factory=threading.Event)
    #: Set when a request has arrived (its body read).
    arrived: threading.Event = field(default_factory=threading.Event)
    #: Set when a client closed its connection while its request was held.
    hung_up: threading.Event = field(default_factory=threading.Event)


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, so that the client's connection pooling shows.
    protocol_version = "HTTP/1.1"
    server: ReceiverServer

    def do_POST(self) -> None:
        receiver = self.server.receiver
        body = self.rfile.read(int(self.headers["Content-Length"]))
        port = self.client_address[1]
        receiver.received.append(Received(self.path, dict(self.headers), json.loads(body), port))
        receiver.arrived.set()
        while not receiver.release.wait(0.01):
            if self._client_hung_up():
                receiver.hung_up.set()
                self.close_connection = True
                return
        answer = receiver.statuses.pop(0) if receiver.statuses else 200
        status, text = answer if isinstance(answer, tuple) else (answer, b"")
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def _client_hung_up(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

    def log_message(self, format: str, *args: object) -> None:
        pass


class ReceiverServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.receiver = Receiver(f"http://127.0.0.1:{self.server_port}/hook")
        self.receiver.release.set()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = ReceiverServer()
    # A short poll interval: shutdown() waits for the serving loop to look again.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server.receiver
    finally:
        server.receiver.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def notification(n: int = 1, outcome: str = "restarted", detail: str = "exit 0") -> Notification:
    return Notification(f"web-{n}.example.net", f"m-{n}", outcome, detail, TIME)


async def deliver_all(notifier: Notifier, *notifications: Notification) -> None:
    """Queue, close, and let run() drain: everything is settled when this returns."""
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            for item in notifications:
                notifier.notify(item)
            notifier.close()


async def wait_for(event: threading.Event, seconds: float = 5) -> None:
    """Wait for an event set by the receiver's thread, without blocking the loop."""
    assert await anyio.to_thread.run_sync(event.wait, seconds), "the receiver saw nothing"


async def test_a_notification_arrives_as_json(receiver):
    notifier = Notifier(receiver.url, headers={"Authorization": "Bearer secret"})
    await deliver_all(notifier, notification())
    [received] = receiver.received
    assert received.path == "/hook"
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["Authorization"] == "Bearer secret"
    assert received.document == {
        "host": "web-1.example.net",
        "message_id": "m-1",
        "outcome": "restarted",
        "detail": "exit 0",
        "time": "2026-01-05T12:00:30+01:00",
    }
    assert (notifier.sent, notifier.failed, notifier.dropped) == (1, 0, 0)


async def test_configured_headers_and_template_arrive(receiver):
    headers = parse_headers(
        ["Authorization=Bearer ${NOTIFY_TOKEN}", "X-Team = chaos-${TEAM}"],
        {"NOTIFY_TOKEN": "s3cret", "TEAM": "sre"},
    )
    template = BodyTemplate('{"text": "{host}: {outcome} ({detail})", "id": "{message_id}"}')
    notifier = Notifier(receiver.url, headers=headers, template=template)
    await deliver_all(notifier, notification(detail='exit 1: "boom"\n{x}'))
    [received] = receiver.received
    assert received.headers["Authorization"] == "Bearer s3cret"
    assert received.headers["X-Team"] == "chaos-sre"
    assert received.headers["Content-Type"] == "application/json"
    assert received.document == {
        "text": 'web-1.example.net: restarted (exit 1: "boom"\n{x})',
        "id": "m-1",
    }


async def test_connections_are_pooled(receiver):
    notifier = Notifier(receiver.url, senders=1)
    await deliver_all(notifier, *(notification(n) for n in range(3)))
    assert notifier.sent == 3
    assert len({r.port for r in receiver.received}) == 1


async def test_a_failing_receiver_gets_it_on_retry(receiver):
    receiver.statuses = [503]
    notifier = Notifier(receiver.url, retry_policy=QUICK)
    await deliver_all(notifier, notification())
    assert [r.document["message_id"] for r in receiver.received] == ["m-1"] * 2
    assert (notifier.sent, notifier.failed) == (1, 0)


async def test_gives_up_after_max_attempts(receiver, caplog):
    receiver.statuses = [502] * 10
    notifier = Notifier(receiver.url, retry_policy=quick(3))
    with caplog.at_level(logging.DEBUG, logger="mandrill.notify"):
        await deliver_all(notifier, notification())
    assert len(receiver.received) == 3
    assert (notifier.sent, notifier.failed) == (0, 1)
    assert "not delivered: HTTP 502 (after 3 attempts)" in caplog.text


@pytest.mark.parametrize("status", [400, 404, 301])
async def test_other_answers_are_not_retried(receiver, caplog, status):
    receiver.statuses = [(status, b"invalid_payload\n")]
    notifier = Notifier(receiver.url, retry_policy=QUICK)
    await deliver_all(notifier, notification())
    assert len(receiver.received) == 1
    assert (notifier.sent, notifier.failed) == (0, 1)
    # The receiver's own words say what it disliked (Slack answers this way).
    assert f"failing: HTTP {status}: invalid_payload;" in caplog.text


async def test_a_refused_connection_is_retried_then_given_up():
    notifier = Notifier(f"http://127.0.0.1:{free_port()}/", retry_policy=quick(2))
    await deliver_all(notifier, notification())
    assert (notifier.sent, notifier.failed) == (0, 1)


async def test_a_request_is_bounded_by_the_request_timeout(receiver, caplog):
    receiver.release.clear()
    notifier = Notifier(receiver.url, retry_policy=quick(1), request_timeout=0.2)
    await deliver_all(notifier, notification())
    assert (notifier.sent, notifier.failed) == (0, 1)
    assert "failing: no answer within 0.2s" in caplog.text
    await wait_for(receiver.hung_up)  # the POST was really given up, not left running


async def test_an_outage_is_logged_once_with_its_cause_and_once_when_over(receiver, caplog):
    receiver.statuses = [503] * 4
    notifier = Notifier(receiver.url, senders=1, retry_policy=quick(2))
    with caplog.at_level(logging.DEBUG, logger="mandrill.notify"):
        await deliver_all(notifier, *(notification(n) for n in range(1, 4)))
    assert (notifier.sent, notifier.failed) == (1, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    receiver_name = receiver.url.removesuffix("/hook")
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"notifications to {receiver_name} failing: HTTP 503;")
    assert warnings[1].startswith(f"notifications to {receiver_name} delivered again after ")
    assert warnings[1].endswith(": 2 not delivered, 0 dropped, 4 failed attempts meanwhile")
    # Each lost notification is still told, at debug level.
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("not delivered: HTTP 503" in line for line in debug) == 2
    # The webhook's path (a Slack or Chat secret) is in no line.
    assert "/hook" not in caplog.text


async def test_an_outage_still_on_at_shutdown_is_summed_up(caplog):
    notifier = Notifier(f"http://127.0.0.1:{free_port()}/", senders=1, retry_policy=quick(1))
    await deliver_all(notifier, notification(1), notification(2))
    assert notifier.failed == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "failing: ConnectError" in warnings[0]
    assert "still failing at shutdown" in warnings[1]
    assert warnings[1].endswith(": 2 not delivered, 0 dropped")


async def test_a_full_queue_drops_the_oldest(receiver, caplog):
    notifier = Notifier(receiver.url, capacity=2, senders=1)
    with caplog.at_level(logging.WARNING, logger="mandrill.notify"):
        for n in range(1, 5):
            notifier.notify(notification(n))
    assert notifier.dropped == 2
    assert caplog.text.count("dropping notifications") == 1
    await deliver_all(notifier)
    assert [r.document["message_id"] for r in receiver.received] == ["m-3", "m-4"]


async def test_the_metrics_count_notifications_sent_failed_and_dropped(receiver):
    """``mandrill_notifications_total{result}``: the oldest dropped from a full queue, one
    refused for good, the rest sent."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from mandrill.obs.collector import build_registry
    from mandrill.obs.counters import Counters

    counters = Counters()
    receiver.statuses = [400]
    notifier = Notifier(receiver.url, capacity=3, senders=1, retry_policy=quick(1),
                        counters=counters)
    for n in range(1, 6):
        notifier.notify(notification(n))
    await deliver_all(notifier)
    text = generate_latest(build_registry(counters, in_flight=lambda: 0)).decode()
    found = {sample.labels["result"]: sample.value
             for family in text_string_to_metric_families(text)
             for sample in family.samples if sample.name == "mandrill_notifications_total"}
    assert found == {"sent": 2, "failed": 1, "dropped": 2}
    assert (notifier.sent, notifier.failed, notifier.dropped) == (2, 1, 2)


async def test_notify_after_close_is_dropped():
    notifier = Notifier("http://127.0.0.1:9/")
    notifier.close()
    notifier.notify(notification())
    assert notifier.dropped == 1
    await deliver_all(notifier)  # run() after close() returns at once


async def test_notify_never_waits_for_a_stuck_receiver(receiver):
    receiver.release.clear()
    notifier = Notifier(receiver.url, capacity=3, senders=1, request_timeout=30, final_flush=0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            notifier.notify(notification(0))
            await wait_for(receiver.arrived)
            start = anyio.current_time()
            for n in range(1, 100):
                notifier.notify(notification(n))
            assert anyio.current_time() - start < 0.5
            assert notifier.dropped == 96
            # With no final flush allowed, the one held by the receiver and the three
            # still queued are dropped.
            tg.cancel_scope.cancel()
    assert notifier.sent == 0
    assert notifier.dropped == 100
    notifier.notify(notification())  # after run() ended: dropped, not an error
    assert notifier.dropped == 101


async def test_a_hanging_receiver_holds_shutdown_no_longer_than_the_final_flush(receiver):
    receiver.release.clear()
    notifier = Notifier(receiver.url, senders=1, request_timeout=30, final_flush=0.5)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            notifier.notify(notification(1))
            await wait_for(receiver.arrived)
            receiver.arrived.clear()
            cancelled_at = anyio.current_time()
            tg.cancel_scope.cancel()
    took = anyio.current_time() - cancelled_at
    assert 0.5 <= took < 1.5, took
    # The sender's POST was cancelled (its connection closed), the final flush tried it
    # again, and its deadline cut that one short too.
    await wait_for(receiver.hung_up)
    await wait_for(receiver.arrived)
    assert [r.document["message_id"] for r in receiver.received] == ["m-1", "m-1"]
    assert (notifier.sent, notifier.failed, notifier.dropped) == (0, 0, 1)


async def test_what_is_queued_at_shutdown_is_still_sent(receiver):
    notifier = Notifier(receiver.url, senders=1)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            for n in range(5):
                notifier.notify(notification(n))
            tg.cancel_scope.cancel()  # the service stopping, right after its last decisions
    assert (notifier.sent, notifier.dropped) == (5, 0)
    assert sorted(r.document["message_id"] for r in receiver.received) == [
        f"m-{n}" for n in range(5)
    ]


# --- what the daemon tells: decisions, unknown outcomes, dead letters ----------------------


async def serve_telling(
    receiver: Receiver, broker: MemoryBroker, restarter: ScriptedRestarter, *,
    worker: WorkerSettings | None = None, shutdown: Shutdown | None = None,
    stop_after: int | None = None, grace: float = 1.0,
) -> list[dict[str, str]]:
    """serve() with the notifier as ``run`` wires it; the documents the receiver got."""
    ledger = await open_ledger(":memory:")
    parts = Parts(broker, ledger, restarter)
    add_notifier(parts, Notifier(receiver.url, retry_policy=quick(1)))
    try:
        with anyio.fail_after(20):
            await serve(ServiceSettings(handle_signals=False, stop_after=stop_after, grace=grace),
                        worker or WorkerSettings(), parts, shutdown=shutdown)
    finally:
        await ledger.aclose()
    return [cast(dict[str, str], r.document) for r in receiver.received]


async def test_dead_letters_are_told(receiver):
    """An invalid payload (no host to name) and a message whose restart failed
    --max-attempts times: each told as ``dead_letter`` with its reason."""
    broker = MemoryBroker()
    await broker.publish([*payloads("db-1"), (b"{not json", {})])
    told = await serve_telling(receiver, broker, ScriptedRestarter(always_fail=["db-1"]),
                               worker=WorkerSettings(max_attempts=2), stop_after=2)
    letters = [doc for doc in told if doc["outcome"] == "dead_letter"]
    failed = [doc for doc in told if doc["outcome"] == "failed"]
    assert len(failed) == 2
    assert sorted((doc["host"], doc["detail"].split(":")[0]) for doc in letters) == [
        ("", "invalid"), (failed[0]["host"], "restart failed 2 times"),
    ]
    assert {doc["message_id"] for doc in letters} >= {failed[0]["message_id"]}


async def test_a_restart_cut_short_is_told_as_unknown(receiver):
    broker = MemoryBroker(ack_deadline=600)
    await broker.publish(payloads("hung"))
    restarter = ScriptedRestarter(block=["hung"])
    shutdown = Shutdown()
    async with anyio.create_task_group() as tg:
        async def run_and_keep() -> None:
            told.extend(await serve_telling(receiver, broker, restarter, shutdown=shutdown,
                                            grace=0.05))

        told: list[dict[str, str]] = []
        tg.start_soon(run_and_keep)
        await restarter.started.wait()
        shutdown.request("test")
    (doc,) = told
    assert doc["outcome"] == "unknown"
    assert doc["host"].startswith("hung.")
    assert "may or may not have happened" in doc["detail"]


@pytest.mark.parametrize(
    ("url", "options", "error"),
    [
        ("ftp://example.net/", {}, "not an http"),
        ("http:///path", {}, "not an http"),
        ("example.net", {}, "not an http"),
        ("https://example.net/", {"capacity": 0}, "capacity"),
        ("https://example.net/", {"senders": 0}, "senders"),
        ("https://example.net/", {"request_timeout": 0}, "request_timeout"),
    ],
)
def test_bad_construction(url, options, error):
    with pytest.raises(ValueError, match=error):
        Notifier(url, **options)


# -- through the CLI, as an operator configures it --

SLACK = '{"text": "{host}: {outcome} ({detail})"}'


@pytest.mark.slow
async def test_the_cli_sends_headers_from_the_environment_and_a_template(
    receiver, tmp_path, backend_name, monkeypatch
):
    monkeypatch.setenv("NOTIFY_TOKEN", "s3cret")
    template = tmp_path / "slack.json"
    template.write_text(SLACK)
    code, _, err = await run_to_end([
        "run", "--backend", backend_name, "--count", "3", "--rate", "0",
        "--restart-latency", "0s", "--restart-failure-rate", "0", "--grace", "2s",
        "--ledger", str(tmp_path / "ledger.db"), "--notify-url", receiver.url,
        "--notify-header", "Authorization=Bearer ${NOTIFY_TOKEN}",
        "--notify-header", "X-Source=mandrill", "--notify-template", f"@{template}",
    ])
    assert code == 0, err
    assert receiver.received
    for received in receiver.received:
        assert received.headers["Authorization"] == "Bearer s3cret"
        assert received.headers["X-Source"] == "mandrill"
        assert set(received.document) == {"text"}
        assert ".example.net: " in received.document["text"]
    assert "s3cret" not in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--notify-header", "Authorization=Bearer ${NOTIFY_TOKEN_UNSET}"],
         "--notify-header: header Authorization: environment variable NOTIFY_TOKEN_UNSET"
         " is not set"),
        (["--notify-header", "Authorization: Bearer s3cret"],
         "--notify-header: expected NAME=VALUE"),
        (["--notify-template", '{"text": "{hostname}"}'],
         "--notify-template: unknown placeholder(s) {hostname}; known: {host}"),
        (["--notify-template", "{text: 1}"], "--notify-template: not valid JSON"),
        (["--notify-template", "@/nonexistent/slack.json"],
         "--notify-template: cannot read template file /nonexistent/slack.json"),
        (["--notify-timeout", "0s"], "--notify-timeout: '0s' must be a duration > 0"),
    ],
)
async def test_bad_notification_settings_exit_2_with_one_line(tmp_path, args, expected):
    code, _, err = await run_to_end([
        "run", "--ledger", str(tmp_path / "l.db"), "--notify-url", "http://127.0.0.1:9/",
        *args,
    ])
    assert code == 2, err
    [line] = err.strip().splitlines()
    assert line.startswith(f"mandrill: error: {expected}"), line
    assert "s3cret" not in err


@pytest.mark.slow
async def test_notification_settings_without_a_url_exit_2(tmp_path):
    code, _, err = await run_to_end([
        "run", "--ledger", str(tmp_path / "l.db"), "--notify-template", SLACK,
    ])
    assert code == 2, err
    assert "mandrill: error: --notify-template needs --notify-url" in err


def test_headers_come_from_an_environment_variable_or_a_toml_list(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_TOKEN", "s3cret")
    environ = {"MANDRILL_NOTIFY_HEADER": "Authorization=Bearer ${NOTIFY_TOKEN}\nX-A=1\n"}
    loaded = config.load("run", {}, environ)
    assert loaded["notify_header"] == (("Authorization", "Bearer s3cret"), ("X-A", "1"))
    toml = tmp_path / "mandrill.toml"
    toml.write_text('notify_header = ["X-A=1", "X-B=${NOTIFY_TOKEN}"]\nnotify_timeout = "2s"\n')
    loaded = config.load("run", {}, {}, str(toml))
    assert loaded["notify_header"] == (("X-A", "1"), ("X-B", "s3cret"))
    assert loaded["notify_timeout"] == 2.0
