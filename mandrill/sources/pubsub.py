"""Google Cloud Pub/Sub as a :class:`~mandrill.sources.base.Source` and a
:class:`~mandrill.sources.base.Topic`, on gcloud-aio-pubsub's REST clients.

Only the clients' plain calls are used (``pull``, ``acknowledge``, ``modify_ack_deadline``,
``publish``, ``get_subscription``, ``create_*``), never its ``subscribe()`` helper, which
spawns unowned tasks and drops ack ids when its acker falls behind. gcloud-aio runs on
asyncio and aiohttp only, so every call into it (creating the clients and their aiohttp
session, and closing them, too) goes through an :class:`~mandrill.sources.bridge.AsyncioBridge`.

Failures are sorted in one place (:func:`is_transient`): HTTP 408, 429 and 5xx, connection
errors and timeouts are retried with exponential backoff and full jitter for a bounded total
time (:class:`RetryPolicy`); anything else, and a transient failure that outlasts the policy,
raises :class:`PubSubError` (a :class:`~mandrill.errors.SourceError`) with one line saying
what failed and why. Calls made with the ``PUBSUB_EMULATOR_HOST`` environment variable set
go to that emulator (gcloud-aio's convention) and need no credentials.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiohttp
import anyio
from gcloud.aio.auth import Token
from gcloud.aio.pubsub import PublisherClient, PubsubMessage, SubscriberClient, SubscriberMessage

from mandrill.errors import SourceError
from mandrill.message import Delivery
from mandrill.retry import GaveUp, RetryPolicy, backoff_delays, retry
from mandrill.sources.base import Source, Topic
from mandrill.sources.bridge import AsyncioBridge, open_asyncio_bridge

T = TypeVar("T")
Item = TypeVar("Item")

#: The API's limits (https://cloud.google.com/pubsub/quotas#resource_limits).
MAX_PULL_MESSAGES: Final = 1000
MAX_ACK_IDS_PER_REQUEST: Final = 2500
#: A settlement request must stay under 512 KB; ack ids are opaque and ~200 bytes on the
#: real service, so 2500 of them can exceed it: keep well clear of the limit.
MAX_ACK_REQUEST_BYTES: Final = 384 * 1024
MAX_PUBLISH_MESSAGES: Final = 1000
#: A publish request must stay under 10 MB (base64 included); leave room for the envelope.
MAX_PUBLISH_REQUEST_BYTES: Final = 9_000_000
MAX_ACK_DEADLINE_SECONDS: Final = 600
MAX_ATTRIBUTE_VALUE_BYTES: Final = 1024

#: Attributes a dead-lettered message carries besides its own.
DEAD_LETTER_REASON_ATTRIBUTE: Final = "mandrill_dead_letter_reason"
DEAD_LETTER_MESSAGE_ID_ATTRIBUTE: Final = "mandrill_original_message_id"

#: Client-side limit of one pull. Keep it longer than the server holds an empty pull (the
#: emulator: ~90 s), so that pulls end by the server's answer: the emulator does not notice
#: a pull its client gave up on, and hands messages whose lease expired to that dead pull,
#: which delays their redelivery by another ack deadline each time (measured: 30 s instead
#: of 10 s with 1 s client timeouts). Cancelling a pull has the same cost, once.
DEFAULT_PULL_WAIT: Final = 100.0
#: Client-side timeout of every other request.
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
#: How long closing the clients may take once the caller is cancelled.
CLOSE_SECONDS: Final = 5.0

_SCOPES: Final = ["https://www.googleapis.com/auth/pubsub"]
_TRANSIENT_STATUSES: Final = frozenset({408, 429})
_ALREADY_EXISTS: Final = 409
_NOT_FOUND: Final = 404


class PubSubError(SourceError):
    """A Pub/Sub call failed for good; ``status`` is the HTTP status, if there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# -- failures: the one place that looks at HTTP statuses --------------------------------------


def http_status(exc: BaseException) -> int | None:
    """The HTTP status gcloud-aio reported (it raises ``aiohttp.ClientResponseError`` for
    any status >= 400, with Google's JSON error body in ``message``), else ``None``."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: HTTP 408, 429 and 5xx, connection errors, truncated
    responses and timeouts. Other HTTP statuses (400, 401, 403, 404, 409) are permanent."""
    status = http_status(exc)
    if status is not None:
        return status in _TRANSIENT_STATUSES or status >= 500
    # TimeoutError and aiohttp's socket timeouts are OSErrors.
    return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | OSError)


def describe_error(exc: BaseException) -> str:
    """One line for a log or an exit message, e.g. ``HTTP 404 NOT_FOUND: Topic not found``."""
    status = http_status(exc)
    if status is not None and isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {status} {_google_error(exc.message)}"
    text = _one_line(str(exc))
    if isinstance(exc, TimeoutError) and not text:
        text = "no response in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _google_error(message: str) -> str:
    # gcloud-aio formats it as "<reason>: <body>"; Google's body is
    # {"error": {"code": 404, "message": "...", "status": "NOT_FOUND"}}.
    _, _, body = message.partition(": ")
    try:
        error = json.loads(body)["error"]
        return _one_line(f"{error['status']}: {error['message']}")
    except (ValueError, KeyError, TypeError):
        return _one_line(message)[:300]


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- retries --------------------------------------------------------------------------------


DEFAULT_RETRY: Final = RetryPolicy()


def _is_transport_failure(exc: Exception) -> bool:
    return isinstance(exc, aiohttp.ClientError | OSError) and is_transient(exc)


async def call_with_retries(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy = DEFAULT_RETRY,
    *,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
    clock: Callable[[], float] = anyio.current_time,
    on_transient_error: Callable[[str, BaseException, float], None] | None = None,
) -> T:
    """Await ``attempt()`` under ``policy`` (:func:`mandrill.retry.retry`), retrying the
    failures :func:`is_transient` accepts; ``on_transient_error(what, error, delay)`` is
    told of each one about to be retried.

    Raises :class:`PubSubError` (``"<what>: <why>"``) at once for a permanent transport
    failure, or when the retries outlast the policy. Exceptions that are no transport
    failure (bugs) propagate unchanged; cancellation interrupts an attempt or a wait at once.
    """

    def on_retry(error: Exception, delay: float) -> None:
        if on_transient_error is not None:
            on_transient_error(what, error, delay)

    try:
        return await retry(
            attempt,
            policy,
            transient=_is_transport_failure,
            on_retry=on_retry,
            rand=rand,
            sleep=sleep,
            clock=clock,
        )
    except GaveUp as exc:
        raise PubSubError(
            f"{what}: gave up after {exc.attempts} attempts in {exc.spent:.1f} s:"
            f" {describe_error(exc.error)}",
            status=http_status(exc.error),
        ) from exc.error
    except (aiohttp.ClientError, OSError) as exc:
        raise PubSubError(f"{what}: {describe_error(exc)}", status=http_status(exc)) from exc


# -- request sizes --------------------------------------------------------------------------


def chunked(
    items: Iterable[Item], *, max_items: int, max_bytes: int, size: Callable[[Item], int]
) -> Iterator[list[Item]]:
    """Split ``items``, in order and none dropped, into lists of at most ``max_items`` whose
    ``size`` sums stay within ``max_bytes``; an item bigger than that goes alone."""
    chunk: list[Item] = []
    total = 0
    for item in items:
        cost = size(item)
        if chunk and (len(chunk) >= max_items or total + cost > max_bytes):
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += cost
    if chunk:
        yield chunk


def ack_id_size(ack_id: str) -> int:
    """Bytes an ack id adds to a request's JSON array (quotes, escapes, separator)."""
    return len(json.dumps(ack_id)) + 2


def message_size(message: tuple[bytes, Mapping[str, str]]) -> int:
    """A generous estimate of the bytes one message adds to a publish request."""
    data, attributes = message
    encoded = 4 * math.ceil(len(data) / 3)
    attrs = sum(len(json.dumps(k)) + len(json.dumps(v)) + 4 for k, v in attributes.items())
    return encoded + attrs + 64


def chunk_ack_ids(ack_ids: Iterable[str]) -> Iterator[list[str]]:
    """Ack ids in request-sized chunks (at most 2500 and well under 512 KB each)."""
    return chunked(
        ack_ids,
        max_items=MAX_ACK_IDS_PER_REQUEST,
        max_bytes=MAX_ACK_REQUEST_BYTES,
        size=ack_id_size,
    )


def chunk_messages(
    messages: Iterable[tuple[bytes, Mapping[str, str]]],
) -> Iterator[list[tuple[bytes, Mapping[str, str]]]]:
    """Messages in publish-request-sized chunks (at most 1000 and ~9 MB each)."""
    return chunked(
        messages,
        max_items=MAX_PUBLISH_MESSAGES,
        max_bytes=MAX_PUBLISH_REQUEST_BYTES,
        size=message_size,
    )


def _truncate_utf8(text: str, limit: int) -> str:
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "..."


# -- names ----------------------------------------------------------------------------------


def topic_path(project: str, topic: str) -> str:
    """``projects/P/topics/T``; a name that already is a full path is kept as it is."""
    return topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"


def subscription_path(project: str, subscription: str) -> str:
    """``projects/P/subscriptions/S``; a full path is kept as it is."""
    if subscription.startswith("projects/"):
        return subscription
    return f"projects/{project}/subscriptions/{subscription}"


# -- clients --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Clients:
    session: aiohttp.ClientSession
    subscriber: SubscriberClient
    publisher: PublisherClient


async def _make_clients(api_root: str | None) -> _Clients:
    # Runs on the asyncio loop: an aiohttp session binds to the loop it is created on.
    # One session (one connection pool) and one token serve both clients.
    session = aiohttp.ClientSession()
    token = Token(scopes=_SCOPES, session=session)
    return _Clients(
        session=session,
        subscriber=SubscriberClient(session=session, token=token, api_root=api_root),
        publisher=PublisherClient(session=session, token=token, api_root=api_root),
    )


@contextlib.asynccontextmanager
async def _open_clients(
    backend: str, bridge: AsyncioBridge | None, api_root: str | None
) -> AsyncIterator[tuple[AsyncioBridge, _Clients]]:
    async with contextlib.AsyncExitStack() as stack:
        if bridge is None:
            bridge = await stack.enter_async_context(open_asyncio_bridge(backend))
        clients = await bridge.call(_make_clients, api_root)
        try:
            yield bridge, clients
        finally:
            # Close even when cancelled, but never hang a shutdown on it.
            with anyio.move_on_after(CLOSE_SECONDS, shield=True):
                await bridge.call(clients.session.close)


async def _publish(
    bridge: AsyncioBridge,
    publisher: PublisherClient,
    topic: str,
    messages: Sequence[tuple[bytes, Mapping[str, str]]],
    policy: RetryPolicy,
    request_timeout: float,
) -> list[str]:
    ids: list[str] = []
    for chunk in chunk_messages(messages):
        body = []
        for data, attributes in chunk:
            message = PubsubMessage(data)
            # Not as keyword arguments: attribute names may clash with its parameters.
            message.attributes = dict(attributes)
            body.append(message)
        attempt = functools.partial(
            bridge.call,
            functools.partial(
                publisher.publish, topic, body, timeout=_whole_seconds(request_timeout)
            ),
        )
        response = await call_with_retries(f"publish to {topic}", attempt, policy)
        chunk_ids = [str(i) for i in response.get("messageIds", [])]
        if len(chunk_ids) != len(chunk):
            raise PubSubError(
                f"publish to {topic}: got {len(chunk_ids)} message ids for {len(chunk)} messages"
            )
        ids.extend(chunk_ids)
    return ids


def _whole_seconds(seconds: float) -> int:
    # gcloud-aio types its timeouts as int.
    return max(1, math.ceil(seconds))


def _to_delivery(message: SubscriberMessage) -> Delivery:
    attempt = message.delivery_attempt
    return Delivery(
        ack_id=message.ack_id,
        message_id=message.message_id,
        # The API omits empty data and absent attributes.
        data=message.data or b"",
        attributes={str(k): str(v) for k, v in (message.attributes or {}).items()},
        publish_time=message.publish_time,
        delivery_attempt=int(attempt) if attempt is not None else None,
    )


# -- the source -----------------------------------------------------------------------------


class PubSubSource:
    """A Pub/Sub subscription as a :class:`~mandrill.sources.base.Source`.

    Made by :func:`open_pubsub_source`, valid inside it only. Every method can block on
    the network for a request timeout plus the retry policy's ``total``, raises
    :class:`PubSubError` once a failure is permanent or retries are exhausted, and is
    cancelled cleanly (an interrupted request is aborted; Pub/Sub settlement is idempotent,
    so a settlement cancelled half-way can simply be sent again).
    """

    def __init__(
        self,
        *,
        bridge: AsyncioBridge,
        clients: _Clients,
        subscription: str,
        dead_letter_topic: str | None,
        ack_deadline: float,
        retry: RetryPolicy,
        pull_wait: float,
        request_timeout: float,
        on_transient_error: Callable[[str, BaseException, float], None] | None = None,
    ) -> None:
        self.subscription = subscription
        self._on_transient_error = on_transient_error
        self.dead_letter_topic = dead_letter_topic
        self.keeps_dead_letters = dead_letter_topic is not None
        self.ack_deadline = ack_deadline
        self.retry = retry
        self._bridge = bridge
        self._clients = clients
        self._pull_wait = _whole_seconds(pull_wait)
        self._request_timeout = _whole_seconds(request_timeout)

    async def pull(self, max_messages: int) -> list[Delivery]:
        """Wait for up to ``max_messages`` deliveries (at most 1000 per call, the API's
        limit); ``[]`` when the server ends an empty long poll (the emulator after ~90 s) or
        ``pull_wait`` passes. To stop waiting sooner, cancel the call (see
        ``DEFAULT_PULL_WAIT`` for what that costs)."""
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        count = min(max_messages, MAX_PULL_MESSAGES)
        messages = await self._call(f"pull from {self.subscription}", self._pull_once, count)
        return [_to_delivery(m) for m in messages]

    async def _pull_once(self, count: int) -> list[SubscriberMessage]:
        # Runs on the asyncio loop. Our timeout is a backstop (see DEFAULT_PULL_WAIT): when
        # it fires, messages the server hands to this pull stay leased until their ack
        # deadline and are then redelivered: late, not lost.
        try:
            return await self._clients.subscriber.pull(
                self.subscription, count, timeout=self._pull_wait
            )
        except aiohttp.ConnectionTimeoutError:
            raise  # the service is unreachable: not an empty poll
        except TimeoutError:
            return []

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        """Ack ``ack_ids`` in as many requests as the API's limits need, one after another.

        Ack ids that expired or were already settled are accepted silently. If a request
        fails for good, the chunks before it are settled and the rest are not.
        """
        for chunk in chunk_ack_ids(ack_ids):
            await self._call(
                f"acknowledge on {self.subscription}",
                functools.partial(
                    self._clients.subscriber.acknowledge,
                    self.subscription,
                    chunk,
                    timeout=self._request_timeout,
                ),
            )

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        """Lease ``ack_ids`` for ``seconds`` (0 to 600, rounded up to whole seconds) from
        now; 0 nacks them, for an immediate redelivery. Chunked like :meth:`acknowledge`."""
        if not 0 <= seconds <= MAX_ACK_DEADLINE_SECONDS:
            raise ValueError(f"seconds must be within 0..{MAX_ACK_DEADLINE_SECONDS}, not {seconds}")
        whole = math.ceil(seconds)
        for chunk in chunk_ack_ids(ack_ids):
            await self._call(
                f"modifyAckDeadline on {self.subscription}",
                functools.partial(
                    self._clients.subscriber.modify_ack_deadline,
                    self.subscription,
                    chunk,
                    whole,
                    timeout=self._request_timeout,
                ),
            )

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish the delivery's data and attributes to the dead-letter topic, with
        ``mandrill_dead_letter_reason`` and ``mandrill_original_message_id`` added; does
        nothing without a dead-letter topic. The caller still settles the delivery (acks it).
        A retried publish may land twice."""
        if self.dead_letter_topic is None:
            await anyio.lowlevel.checkpoint()
            return
        attributes = {
            **delivery.attributes,
            DEAD_LETTER_REASON_ATTRIBUTE: _truncate_utf8(reason, MAX_ATTRIBUTE_VALUE_BYTES),
            DEAD_LETTER_MESSAGE_ID_ATTRIBUTE: delivery.message_id,
        }
        await _publish(
            self._bridge,
            self._clients.publisher,
            self.dead_letter_topic,
            [(delivery.data, attributes)],
            self.retry,
            self._request_timeout,
        )

    async def _call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await call_with_retries(
            what,
            functools.partial(self._bridge.call, fn, *args),
            self.retry,
            on_transient_error=self._on_transient_error,
        )


@contextlib.asynccontextmanager
async def open_pubsub_source(
    *,
    project: str,
    subscription: str,
    backend: str,
    dead_letter_topic: str | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    pull_wait: float = DEFAULT_PULL_WAIT,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    bridge: AsyncioBridge | None = None,
    api_root: str | None = None,
    on_transient_error: Callable[[str, BaseException, float], None] | None = None,
) -> AsyncIterator[PubSubSource]:
    """Open ``subscription`` (a name in ``project``, or a full path) for pulling.

    ``backend`` is the one given to ``anyio.run``; on trio the clients run behind an
    asyncio bridge, this one's own unless ``bridge`` is given (then it is shared, not
    closed). ``api_root`` overrides the endpoint (else ``PUBSUB_EMULATOR_HOST`` or the
    real service). Reads the subscription's ack deadline first: raises
    :class:`PubSubError` (status 404) if the subscription does not exist, or as any call
    does. The dead-letter topic is not checked until something is dead-lettered. Closing
    closes the clients' aiohttp session, shielded but bounded by ``CLOSE_SECONDS``.
    """
    path = subscription_path(project, subscription)
    dead_letter_path = topic_path(project, dead_letter_topic) if dead_letter_topic else None
    async with _open_clients(backend, bridge, api_root) as (bridge, clients):
        what = f"get subscription {path}"
        try:
            info = await call_with_retries(
                what,
                functools.partial(
                    bridge.call,
                    functools.partial(
                        clients.subscriber.get_subscription,
                        path,
                        timeout=_whole_seconds(request_timeout),
                    ),
                ),
                retry,
            )
        except PubSubError as exc:
            if exc.status == _NOT_FOUND:
                raise PubSubError(f"subscription {path} not found", status=exc.status) from None
            raise
        yield PubSubSource(
            bridge=bridge,
            clients=clients,
            subscription=path,
            dead_letter_topic=dead_letter_path,
            ack_deadline=float(info.get("ackDeadlineSeconds", 10)),
            retry=retry,
            pull_wait=pull_wait,
            request_timeout=request_timeout,
            on_transient_error=on_transient_error,
        )


# -- the topic ------------------------------------------------------------------------------


class PubSubTopic:
    """A Pub/Sub topic as a :class:`~mandrill.sources.base.Topic`; made by
    :func:`open_pubsub_topic`, valid inside it only."""

    def __init__(
        self,
        *,
        bridge: AsyncioBridge,
        clients: _Clients,
        topic: str,
        retry: RetryPolicy,
        request_timeout: float,
    ) -> None:
        self.topic = topic
        self.retry = retry
        self._bridge = bridge
        self._clients = clients
        self._request_timeout = request_timeout

    async def publish(self, messages: Sequence[tuple[bytes, Mapping[str, str]]]) -> list[str]:
        """Publish ``(data, attributes)`` pairs, in requests of at most 1000 messages and
        ~9 MB, one after another; returns their message ids in order.

        Blocks on the network and raises :class:`PubSubError` like the source's calls. A
        message needs data or attributes (the API rejects an empty one with 400). A retried
        request may publish its messages twice; if a request fails for good, the ones
        before it are published and the rest are not.
        """
        return await _publish(
            self._bridge,
            self._clients.publisher,
            self.topic,
            messages,
            self.retry,
            self._request_timeout,
        )


@contextlib.asynccontextmanager
async def open_pubsub_topic(
    *,
    project: str,
    topic: str,
    backend: str,
    retry: RetryPolicy = DEFAULT_RETRY,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    bridge: AsyncioBridge | None = None,
    api_root: str | None = None,
) -> AsyncIterator[PubSubTopic]:
    """Open ``topic`` (a name in ``project``, or a full path) for publishing; no request is
    made until the first publish (a missing topic raises :class:`PubSubError` there).
    ``backend``, ``bridge`` and ``api_root`` are as for :func:`open_pubsub_source`."""
    async with _open_clients(backend, bridge, api_root) as (bridge, clients):
        yield PubSubTopic(
            bridge=bridge,
            clients=clients,
            topic=topic_path(project, topic),
            retry=retry,
            request_timeout=request_timeout,
        )


# -- setup ----------------------------------------------------------------------------------


async def setup_pubsub(
    *,
    project: str,
    topic: str,
    subscription: str,
    backend: str,
    ack_deadline: int = 30,
    dead_letter_topic: str | None = None,
    max_delivery_attempts: int = 5,
    retry: RetryPolicy = DEFAULT_RETRY,
    bridge: AsyncioBridge | None = None,
    api_root: str | None = None,
) -> list[str]:
    """Create what mandrill needs, keeping whatever already exists; safe to run again.

    Creates ``topic``, and, with ``dead_letter_topic``, that topic and a subscription
    ``{dead_letter_topic}-sub`` on it (so dead letters are kept, not dropped), then
    ``subscription`` on ``topic`` with ``ack_deadline`` (10 to 600 s) and a dead-letter
    policy after ``max_delivery_attempts`` (5 to 100). An existing subscription is not
    changed: a differing ack deadline or dead-letter topic is reported in the result.
    On Google Cloud the Pub/Sub service account also needs publish rights on the
    dead-letter topic and subscribe rights on the subscription; grant them with IAM.

    Returns one line per resource ("created …" / "found …"). Raises :class:`PubSubError`
    as the source's calls do, e.g. for a missing permission.
    """
    topic_name = topic_path(project, topic)
    sub_name = subscription_path(project, subscription)
    dead_name = topic_path(project, dead_letter_topic) if dead_letter_topic else None
    timeout = _whole_seconds(DEFAULT_REQUEST_TIMEOUT)
    report: list[str] = []
    async with _open_clients(backend, bridge, api_root) as (bridge, clients):

        async def create(kind: str, name: str, fn: Callable[[], Awaitable[object]]) -> bool:
            try:
                await call_with_retries(
                    f"create {kind} {name}", functools.partial(bridge.call, fn), retry
                )
            except PubSubError as exc:
                if exc.status != _ALREADY_EXISTS:
                    raise
                report.append(f"found {kind} {name}")
                return False
            report.append(f"created {kind} {name}")
            return True

        publisher, subscriber = clients.publisher, clients.subscriber
        await create(
            "topic",
            topic_name,
            functools.partial(publisher.create_topic, topic_name, {}, timeout=timeout),
        )
        body: dict[str, Any] = {"ackDeadlineSeconds": ack_deadline}
        if dead_name is not None:
            dead_sub = f"{subscription_path(project, dead_name.rsplit('/', 1)[1])}-sub"
            await create(
                "topic",
                dead_name,
                functools.partial(publisher.create_topic, dead_name, {}, timeout=timeout),
            )
            await create(
                "subscription",
                dead_sub,
                functools.partial(
                    subscriber.create_subscription, dead_sub, dead_name, {}, timeout=timeout
                ),
            )
            body["deadLetterPolicy"] = {
                "deadLetterTopic": dead_name,
                "maxDeliveryAttempts": max_delivery_attempts,
            }
        created = await create(
            "subscription",
            sub_name,
            functools.partial(
                subscriber.create_subscription, sub_name, topic_name, body, timeout=timeout
            ),
        )
        if not created:
            info = await call_with_retries(
                f"get subscription {sub_name}",
                functools.partial(
                    bridge.call,
                    functools.partial(subscriber.get_subscription, sub_name, timeout=timeout),
                ),
                retry,
            )
            report[-1] += _differences(info, topic_name, ack_deadline, dead_name)
    return report


def _differences(
    info: Mapping[str, Any], topic: str, ack_deadline: int, dead_letter_topic: str | None
) -> str:
    notes = []
    if info.get("topic") != topic:
        notes.append(f"its topic is {info.get('topic')}")
    if info.get("ackDeadlineSeconds") != ack_deadline:
        notes.append(f"its ack deadline is {info.get('ackDeadlineSeconds')} s")
    found_dead = info.get("deadLetterPolicy", {}).get("deadLetterTopic")
    if found_dead != dead_letter_topic:
        notes.append(f"its dead-letter topic is {found_dead or 'unset'}")
    return f" ({'; '.join(notes)}; left unchanged)" if notes else ""


if TYPE_CHECKING:

    def _implements(source: PubSubSource, topic: PubSubTopic) -> tuple[Source, Topic]:
        return source, topic  # mypy checks both against their protocols here


__all__ = [
    "DEAD_LETTER_MESSAGE_ID_ATTRIBUTE",
    "DEAD_LETTER_REASON_ATTRIBUTE",
    "DEFAULT_RETRY",
    "PubSubError",
    "PubSubSource",
    "PubSubTopic",
    "RetryPolicy",
    "backoff_delays",
    "call_with_retries",
    "chunk_ack_ids",
    "chunk_messages",
    "describe_error",
    "http_status",
    "is_transient",
    "open_pubsub_source",
    "open_pubsub_topic",
    "setup_pubsub",
]
