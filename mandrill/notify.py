"""Tell a webhook about every restart decision, without ever holding up a message.

A worker calls :meth:`Notifier.notify`, which only queues (synchronous, never blocks); the
long-lived :meth:`Notifier.run` task sends each notification as one JSON document in one
POST, with a few retries. Notifications are best effort: when the queue is full the
*oldest* waiting one is dropped and counted. Dropping the oldest rather than the newest
because a queue only fills when the receiver is down or slow, and once it is back the
decisions of the last minutes tell an operator more than those of an hour ago.

The HTTP client is the standard library's ``urllib.request``, run in worker threads
(``anyio.to_thread.run_sync``). It works the same on asyncio and trio without the asyncio
bridge (aiohttp would need its session created, used and closed on the bridge's loop, and
closed before the bridge), honours the usual ``HTTPS_PROXY`` variables, and a few threads
are nothing at the rate decisions are made. The cost: a cancelled send abandons its thread,
which ends at the latest after ``request_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskStatus

from mandrill.message import Message

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1000
#: Concurrent POSTs: enough to keep up with a slow receiver, few enough to be polite.
DEFAULT_SENDERS = 2
DEFAULT_MAX_ATTEMPTS = 5
#: First pause between two attempts; doubled after each, up to ``DEFAULT_MAX_BACKOFF``.
DEFAULT_BACKOFF = 0.5
DEFAULT_MAX_BACKOFF = 30.0
DEFAULT_REQUEST_TIMEOUT = 10.0
#: At shutdown, how long what is still queued may take to send (the decisions of the last
#: moments before a stop are the ones an operator matches to an incident).
DEFAULT_FINAL_FLUSH = 2.0
#: How much of a receiver's answer is read (and thrown away) so the connection ends cleanly.
_MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Notification:
    """One decision about one message; ``time`` must be timezone-aware."""

    host: str
    message_id: str
    outcome: str
    detail: str
    time: datetime

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError("a notification's time must be timezone-aware")

    @classmethod
    def for_message(
        cls, message: Message, outcome: str, detail: str, time: datetime
    ) -> Notification:
        return cls(message.hostname, message.message_id, str(outcome), detail, time)

    def to_json(self) -> bytes:
        """``{"host", "message_id", "outcome", "detail", "time"}``; time in ISO 8601."""
        document = {
            "host": self.host,
            "message_id": self.message_id,
            "outcome": self.outcome,
            "detail": self.detail,
            "time": self.time.isoformat(),
        }
        return json.dumps(document).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would turn a redirected POST into a GET and lose the document; a 3xx is
    # reported as the failure it is instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class Notifier:
    """Posts a JSON document per decision to ``url``.

    ``capacity`` notifications may wait; beyond that the oldest is dropped (counted in
    :attr:`dropped`, logged once per overflow). Each is tried ``max_attempts`` times on a
    connection error, timeout, 429 or 5xx, with doubling pauses from ``backoff`` up to
    ``max_backoff`` seconds; any other answer outside 2xx fails it at once. Delivered and
    given-up notifications are counted in :attr:`sent` and :attr:`failed`.

    Call :meth:`notify` from the event loop's thread only. Raises ``ValueError`` at
    construction for a URL that is not http(s) or for bad limits.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        capacity: int = DEFAULT_CAPACITY,
        senders: int = DEFAULT_SENDERS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        final_flush: float = DEFAULT_FINAL_FLUSH,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"notification URL {url!r} is not an http(s) URL")
        for name, value in (("capacity", capacity), ("senders", senders)):
            if value < 1:
                raise ValueError(f"notifier {name} must be >= 1, not {value}")
        if max_attempts < 1:
            raise ValueError(f"notifier max_attempts must be >= 1, not {max_attempts}")
        if not request_timeout > 0:
            raise ValueError(f"notifier request_timeout must be > 0, not {request_timeout}")
        self.url = url
        self.senders = senders
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.request_timeout = request_timeout
        self.final_flush = final_flush
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": "mandrill",
            **(headers or {}),
        }
        self._send, self._receive = anyio.create_memory_object_stream[Notification](capacity)
        self._overflowing = False
        self._running = False
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def notify(self, notification: Notification) -> None:
        """Queue ``notification``; never blocks. Full queue: the oldest is dropped.

        After :meth:`close`, or once :meth:`run` has ended, notifications are dropped.
        """
        try:
            try:
                self._send.send_nowait(notification)
            except anyio.WouldBlock:
                self._receive.receive_nowait()  # the oldest: see the module docstring
                self._count_drop()
                self._send.send_nowait(notification)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._count_drop()

    def _count_drop(self) -> None:
        self.dropped += 1
        if not self._overflowing:
            self._overflowing = True
            log.warning(
                "notification queue full or closed: dropping notifications (%d so far)",
                self.dropped,
            )

    def close(self) -> None:
        """Accept no more notifications; :meth:`run` returns once the queued ones are sent."""
        self._send.close()
        if not self._running:
            self._receive.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send queued notifications until :meth:`close` has been called and the queue is
        empty (up to ``max_attempts`` tries each, so bound that wait with a deadline).

        Reports started at once. Never raises for a failed notification. Cancelling it (the
        service's shutdown, once every worker is done) sends what is still queued for up to
        ``final_flush`` seconds, shielded, then drops the rest (counted); a POST under way
        finishes in its thread within ``request_timeout``.
        """
        self._running = True
        limiter = anyio.CapacityLimiter(self.senders)
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.senders):
                    tg.start_soon(self._sender, limiter)
                task_status.started()
        finally:
            self._running = False
            self._send.close()
            in_hand = None
            with anyio.move_on_after(self.final_flush, shield=True):
                while (in_hand := self._next_queued()) is not None:
                    await self._deliver(in_hand, limiter)
            # Not None only if the deadline cut its delivery short.
            if in_hand is not None:
                self._count_drop()
            while self._next_queued() is not None:
                self._count_drop()
            self._receive.close()

    def _next_queued(self) -> Notification | None:
        try:
            return self._receive.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return None

    async def _sender(self, limiter: anyio.CapacityLimiter) -> None:
        # Closed already if close() came before run(): then there is nothing to send.
        with contextlib.suppress(anyio.ClosedResourceError):
            async for notification in self._receive:
                if self._overflowing and self._receive.statistics().current_buffer_used == 0:
                    self._overflowing = False
                    log.warning("notification queue drained; %d dropped in all", self.dropped)
                await self._deliver(notification, limiter)

    async def _deliver(self, notification: Notification, limiter: anyio.CapacityLimiter) -> None:
        body = notification.to_json()
        problem = ""
        for attempt in range(self.max_attempts):
            if attempt:
                await anyio.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                status = await anyio.to_thread.run_sync(
                    self._post, body, abandon_on_cancel=True, limiter=limiter
                )
            except (OSError, http.client.HTTPException) as exc:
                # URLError, timeouts and refused or reset connections are all OSErrors.
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= status < 300:
                self.sent += 1
                return
            problem = f"HTTP {status}"
            if status != 429 and status < 500:
                break
        self.failed += 1
        log.warning(
            "notification for %s (message %s) not delivered: %s",
            notification.host,
            notification.message_id,
            problem,
        )

    def _post(self, body: bytes) -> int:
        """Runs in a worker thread: one POST, its status (also for an error status)."""
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.request_timeout) as response:
                response.read(_MAX_ANSWER_BYTES)
                return int(response.status)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code
