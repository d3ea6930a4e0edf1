"""Tell a webhook about every restart decision, without ever holding up a message.

A worker calls :meth:`Notifier.notify`, which only queues (synchronous, never blocks); the
long-lived :meth:`Notifier.run` task sends each notification as one JSON document in one
POST, retried by :func:`mandrill.retry.retry`. Notifications are best effort: when the
queue is full the *oldest* waiting one is dropped and counted. Dropping the oldest rather
than the newest because a queue only fills when the receiver is down or slow, and once it
is back the decisions of the last minutes tell an operator more than those of an hour ago.

The HTTP client is httpx: built on anyio, so it runs natively on asyncio and on trio (no
worker threads, no asyncio bridge), pools its connections, and a cancelled POST is really
cancelled — its connection is closed at once, nothing outlives :meth:`Notifier.run`. It
honours the usual ``HTTPS_PROXY`` variables, as urllib did before it.

A receiver that is down is one outage, not one warning per notification: its first
failure is logged with the reason, the notifications lost meanwhile at debug level only
(and counted), and one line says when deliveries succeed again — as the ledger does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import cast
from urllib.parse import urlsplit

import anyio
import httpx
from anyio.abc import TaskStatus

from mandrill.errors import one_line
from mandrill.notification import BodyTemplate, Notification
from mandrill.obs.counters import Counters
from mandrill.retry import GaveUp, RetryPolicy, retry

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1000
#: Concurrent POSTs (and pooled connections): enough to keep up with a slow receiver, few
#: enough to be polite.
DEFAULT_SENDERS = 2
#: Five tries spread over a few seconds, jittered: a receiver restarting gets the
#: notification, a receiver that is down does not hold a sender for long.
DEFAULT_RETRY = RetryPolicy(initial=0.5, cap=30.0, total=60.0, attempts=5)
DEFAULT_REQUEST_TIMEOUT = 10.0
#: At shutdown, how long what is still queued may take to send (the decisions of the last
#: moments before a stop are the ones an operator matches to an incident).
DEFAULT_FINAL_FLUSH = 2.0
#: How much of a receiver's answer is read: enough for an error's text, and a receiver
#: that streams for ever cannot hold a sender.
_MAX_ANSWER_BYTES = 64 * 1024
#: How much of a refusal's answer goes into the log line (Slack answers "invalid_payload").
_ANSWER_IN_LOG = 200

__all__ = ["DEFAULT_RETRY", "BodyTemplate", "Notification", "Notifier"]


class _Refused(Exception):
    """The receiver answered, outside 2xx."""

    def __init__(self, status: int, answer: bytes) -> None:
        text = one_line(answer[:_ANSWER_IN_LOG].decode(errors="replace"))
        super().__init__(f"HTTP {status}" + (f": {text}" if text else ""))
        self.status = status


def _transient(error: Exception) -> bool:
    """429, 5xx, no answer in time, and connection trouble are worth another try; any other
    answer (a 3xx is not followed: a redirected POST would lose its body) is not."""
    if isinstance(error, _Refused):
        return error.status == 429 or error.status >= 500
    if isinstance(error, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return False
    return isinstance(error, httpx.TransportError | TimeoutError)


@dataclass
class _Outage:
    since: float
    #: ``Notifier.dropped`` when it began: the drops during it are the difference.
    dropped_before: int
    failed: int = 0
    failed_attempts: int = 0


class Notifier:
    """Posts a JSON document per decision to ``url``.

    ``headers`` are sent with every request; ``template``, if given, shapes the body
    (otherwise ``{"host", "message_id", "outcome", "detail", "time"}``). ``capacity``
    notifications may wait; beyond that the oldest is dropped (counted in :attr:`dropped`,
    logged once per overflow). Each is tried under ``retry_policy`` on a connection error,
    a request taking over ``request_timeout`` seconds, 429 or 5xx; any other answer outside
    2xx fails it at once. Delivered and given-up notifications are counted in :attr:`sent`
    and :attr:`failed`; all three counts live in ``counters`` (``notifications_*``: the
    daemon's metrics), a fresh :class:`Counters` if none is given.

    Call :meth:`notify` from the event loop's thread only. Raises ``ValueError`` at
    construction for a URL that is not http(s) or for bad limits.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        template: BodyTemplate | None = None,
        capacity: int = DEFAULT_CAPACITY,
        senders: int = DEFAULT_SENDERS,
        retry_policy: RetryPolicy = DEFAULT_RETRY,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        final_flush: float = DEFAULT_FINAL_FLUSH,
        counters: Counters | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Not repeated: a webhook URL is a secret (Slack, Chat) and errors reach logs.
            raise ValueError("notification URL is not an http(s) URL with a host")
        for name, value in (("capacity", capacity), ("senders", senders)):
            if value < 1:
                raise ValueError(f"notifier {name} must be >= 1, not {value}")
        if not request_timeout > 0:
            raise ValueError(f"notifier request_timeout must be > 0, not {request_timeout}")
        self.url = url
        #: What log lines name: a webhook's path and query are its secret (Slack, Chat).
        self.receiver = f"{parts.scheme}://{parts.hostname}" + (
            f":{parts.port}" if parts.port else ""
        )
        self.senders = senders
        self.retry_policy = retry_policy
        self.request_timeout = request_timeout
        self.final_flush = final_flush
        self._headers = httpx.Headers(
            {"Content-Type": "application/json", "User-Agent": "mandrill"}
        )
        self._headers.update(dict(headers))
        self._template = template
        self._send, self._receive = anyio.create_memory_object_stream[Notification](capacity)
        # Taken from the queue, not yet delivered or given up: retried first at shutdown
        # if a sender is cancelled with it.
        self._in_hand: list[Notification] = []
        self._overflowing = False
        self._running = False
        self._outage: _Outage | None = None
        self.counters = counters if counters is not None else Counters()

    @property
    def sent(self) -> int:
        return self.counters.notifications_sent

    @property
    def failed(self) -> int:
        return self.counters.notifications_failed

    @property
    def dropped(self) -> int:
        return self.counters.notifications_dropped

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
        self.counters.notifications_dropped += 1
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
        empty (each retried under ``retry_policy``, so bound that wait with a deadline).

        Opens the HTTP client (its connection pool) and closes it before returning. Reports
        started once the client is ready. Never raises for a failed notification.
        Cancelling it (the service's shutdown, once every worker is done) cancels the POSTs
        under way, then sends what they held and what is still queued for up to
        ``final_flush`` seconds, shielded, and drops the rest (counted).
        """
        self._running = True
        try:
            # Loading the CA certificates takes tens of milliseconds (the first time, a few
            # hundred): not on the event loop.
            client = await anyio.to_thread.run_sync(self._open_client)
            async with client:
                try:
                    async with anyio.create_task_group() as tg:
                        for _ in range(self.senders):
                            tg.start_soon(self._sender, client)
                        task_status.started()
                finally:
                    self._send.close()
                    await self._flush(client)
        finally:
            self._running = False
            self._send.close()
            for _ in self._in_hand:
                self._count_drop()
            self._in_hand.clear()
            while self._next_queued() is not None:
                self._count_drop()
            self._receive.close()
            if self._outage is not None:
                log.warning(
                    "notifications to %s still failing at shutdown, for %.1fs:"
                    " %d not delivered, %d dropped",
                    self.receiver,
                    anyio.current_time() - self._outage.since,
                    self._outage.failed,
                    self.dropped - self._outage.dropped_before,
                )

    def _open_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            headers=self._headers,
            # The whole exchange is bounded by _post's fail_after: httpx's own timeouts
            # bound each read, so a receiver trickling its answer could hold a sender.
            timeout=None,
            limits=httpx.Limits(
                max_connections=self.senders, max_keepalive_connections=self.senders
            ),
            follow_redirects=False,
        )

    async def _flush(self, client: httpx.AsyncClient) -> None:
        """Shielded, within ``final_flush``: what cancelled senders held, then the queue.
        Whatever is left is counted as dropped by run()."""
        pending, self._in_hand = self._in_hand, []
        with anyio.move_on_after(self.final_flush, shield=True):
            while True:
                notification = pending.pop(0) if pending else self._next_queued()
                if notification is None:
                    break
                await self._deliver(client, notification)
        self._in_hand.extend(pending)

    def _next_queued(self) -> Notification | None:
        try:
            return self._receive.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return None

    async def _sender(self, client: httpx.AsyncClient) -> None:
        # Closed already if close() came before run(): then there is nothing to send.
        with contextlib.suppress(anyio.ClosedResourceError):
            async for notification in self._receive:
                if self._overflowing and self._receive.statistics().current_buffer_used == 0:
                    self._overflowing = False
                    log.warning("notification queue drained; %d dropped in all", self.dropped)
                await self._deliver(client, notification)

    async def _deliver(self, client: httpx.AsyncClient, notification: Notification) -> None:
        """One notification, retried; counted as sent or failed. While it is under way it
        is in ``_in_hand``, and stays there if cancelled."""
        self._in_hand.append(notification)
        body = (
            self._template.render(notification)
            if self._template is not None
            else notification.to_json()
        )
        try:
            await retry(
                partial(self._post, client, body),
                self.retry_policy,
                transient=_transient,
                on_retry=partial(self._attempt_failed, notification),
            )
        except GaveUp as exc:
            problem = f"{self._describe(exc.error)} (after {exc.attempts} attempts)"
        except (_Refused, httpx.HTTPError, TimeoutError) as exc:
            problem = self._describe(exc)
        else:
            self._in_hand.remove(notification)
            self.counters.notifications_sent += 1
            self._delivered()
            return
        self._in_hand.remove(notification)
        self.counters.notifications_failed += 1
        outage = self._failing(problem)
        outage.failed += 1
        outage.failed_attempts += 1
        log.debug(
            "notification for %s (message %s) not delivered: %s",
            notification.host,
            notification.message_id,
            problem,
        )

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> None:
        """One POST: returns on a 2xx answer; raises :class:`_Refused` for any other,
        ``TimeoutError`` past ``request_timeout``, ``httpx.TransportError`` otherwise."""
        with anyio.fail_after(self.request_timeout):
            async with client.stream("POST", self.url, content=body) as response:
                answer = bytearray()
                # An async generator (typed as an iterator): closed here, not by the garbage
                # collector, when the answer is cut short.
                raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
                async with contextlib.aclosing(raw) as chunks:
                    async for chunk in chunks:
                        answer += chunk
                        if len(answer) >= _MAX_ANSWER_BYTES:
                            break
        if not response.is_success:
            raise _Refused(response.status_code, bytes(answer))

    def _attempt_failed(self, notification: Notification, error: Exception, delay: float) -> None:
        # Called by retry() before each retry: a failed attempt is the outage's first sign.
        problem = self._describe(error)
        self._failing(problem).failed_attempts += 1
        log.debug(
            "notification for %s (message %s): %s; retrying in %.1fs",
            notification.host,
            notification.message_id,
            problem,
            delay,
        )

    def _failing(self, problem: str) -> _Outage:
        """The current outage; the first failure starts one and is the line that says why."""
        if self._outage is None:
            self._outage = _Outage(anyio.current_time(), self.dropped)
            log.warning(
                "notifications to %s failing: %s; retrying, further failures logged at"
                " debug level until one is delivered",
                self.receiver,
                problem,
            )
        return self._outage

    def _delivered(self) -> None:
        outage, self._outage = self._outage, None
        if outage is not None:
            log.warning(
                "notifications to %s delivered again after %.1fs: %d not delivered,"
                " %d dropped, %d failed attempts meanwhile",
                self.receiver,
                anyio.current_time() - outage.since,
                outage.failed,
                self.dropped - outage.dropped_before,
                outage.failed_attempts,
            )

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, TimeoutError):
            return f"no answer within {self.request_timeout:g}s"
        if isinstance(error, _Refused):
            return str(error)
        text = one_line(str(error))
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
