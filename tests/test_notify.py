"""The notifier against a real HTTP receiver on 127.0.0.1 (a stdlib server in a thread)."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest

from mandrill.message import Message
from mandrill.notify import Notification, Notifier

TIME = datetime(2026, 1, 5, 12, 0, 30, tzinfo=timezone(timedelta(hours=1)))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    document: dict[str, str]


@dataclass
class Receiver:
    url: str = ""
    #: Answers to the next requests, in order; 200 once they run out.
    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    #: While clear, requests are held without an answer.
    release: threading.Event = field(default_factory=threading.Event)


class Handler(BaseHTTPRequestHandler):
    server: ReceiverServer

    def do_POST(self) -> None:
        receiver = self.server.receiver
        body = self.rfile.read(int(self.headers["Content-Length"]))
        receiver.received.append(Received(self.path, dict(self.headers), json.loads(body)))
        receiver.release.wait(30)
        status = receiver.statuses.pop(0) if receiver.statuses else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

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


def notification(n: int = 1, outcome: str = "restarted") -> Notification:
    return Notification(f"web-{n}.example.net", f"m-{n}", outcome, "exit 0", TIME)


async def deliver_all(notifier: Notifier, *notifications: Notification) -> None:
    """Queue, close, and let run() drain: everything is settled when this returns."""
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            for item in notifications:
                notifier.notify(item)
            notifier.close()


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


async def test_a_failing_receiver_gets_it_on_retry(receiver):
    receiver.statuses = [500, 503]
    notifier = Notifier(receiver.url, backoff=0.01)
    await deliver_all(notifier, notification())
    assert [r.document["message_id"] for r in receiver.received] == ["m-1"] * 3
    assert (notifier.sent, notifier.failed) == (1, 0)


async def test_gives_up_after_max_attempts(receiver, caplog):
    receiver.statuses = [502] * 10
    notifier = Notifier(receiver.url, backoff=0.01, max_attempts=3)
    await deliver_all(notifier, notification())
    assert len(receiver.received) == 3
    assert (notifier.sent, notifier.failed) == (0, 1)
    assert "not delivered: HTTP 502" in caplog.text


@pytest.mark.parametrize("status", [400, 404, 301])
async def test_other_answers_are_not_retried(receiver, status):
    receiver.statuses = [status]
    notifier = Notifier(receiver.url, backoff=0.01)
    await deliver_all(notifier, notification())
    assert len(receiver.received) == 1
    assert (notifier.sent, notifier.failed) == (0, 1)


async def test_a_refused_connection_is_retried_then_given_up():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    notifier = Notifier(f"http://127.0.0.1:{port}/", backoff=0.01, max_attempts=2)
    await deliver_all(notifier, notification())
    assert (notifier.sent, notifier.failed) == (0, 1)


async def test_a_full_queue_drops_the_oldest(receiver, caplog):
    notifier = Notifier(receiver.url, capacity=2, senders=1)
    with caplog.at_level(logging.WARNING, logger="mandrill.notify"):
        for n in range(1, 5):
            notifier.notify(notification(n))
    assert notifier.dropped == 2
    assert caplog.text.count("dropping notifications") == 1
    await deliver_all(notifier)
    assert [r.document["message_id"] for r in receiver.received] == ["m-3", "m-4"]


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
            # Polled: the receiver records requests in its own thread.
            while not receiver.received:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            start = anyio.current_time()
            for n in range(1, 100):
                notifier.notify(notification(n))
            assert anyio.current_time() - start < 0.5
            assert notifier.dropped == 96
            # Cancelling run() does not wait for the POST held by the receiver; with no
            # final flush allowed, the three still queued are dropped.
            tg.cancel_scope.cancel()
    assert notifier.sent == 0
    assert notifier.dropped == 99
    notifier.notify(notification())  # after run() ended: dropped, not an error
    assert notifier.dropped == 100


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


def test_notification_from_a_message():
    message = Message("m-9", "Db-2", "db-2.example.net", TIME, 3)
    made = Notification.for_message(message, "skipped", "host excluded", TIME)
    assert made == Notification("db-2.example.net", "m-9", "skipped", "host excluded", TIME)
    assert json.loads(made.to_json())["time"] == "2026-01-05T12:00:30+01:00"


def test_naive_time_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        Notification("h", "m", "restarted", "", datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("url", "options", "error"),
    [
        ("ftp://example.net/", {}, "not an http"),
        ("http:///path", {}, "not an http"),
        ("example.net", {}, "not an http"),
        ("https://example.net/", {"capacity": 0}, "capacity"),
        ("https://example.net/", {"senders": 0}, "senders"),
        ("https://example.net/", {"max_attempts": 0}, "max_attempts"),
        ("https://example.net/", {"request_timeout": 0}, "request_timeout"),
    ],
)
def test_bad_construction(url, options, error):
    with pytest.raises(ValueError, match=error):
        Notifier(url, **options)


def test_time_is_utc_when_given_in_utc():
    made = Notification("h", "m", "dry_run", "", datetime(2026, 1, 1, tzinfo=UTC))
    assert json.loads(made.to_json())["time"] == "2026-01-01T00:00:00+00:00"
