"""A Pub/Sub subscription as a :class:`~mandrill.sources.base.Source`.

Only the clients' plain calls are used (``pull``, ``acknowledge``, ``modify_ack_deadline``,
``publish``, ``get_subscription``), never gcloud-aio's ``subscribe()`` helper, which spawns
unowned tasks and drops ack ids when its acker falls behind. gcloud-aio runs on asyncio and
aiohttp only, so every call into it goes through an
:class:`~mandrill.sources.bridge.AsyncioBridge`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeVar

import aiohttp
import anyio
from gcloud.aio.pubsub import SubscriberMessage

from mandrill.errors import ConfigError
from mandrill.message import Delivery
from mandrill.outage import Outage
from mandrill.retry import RetryPolicy
from mandrill.sources.base import Source
from mandrill.sources.bridge import AsyncioBridge
from mandrill.sources.limits import MAX_ACK_DEADLINE_SECONDS, MAX_PULL_MESSAGES
from mandrill.sources.pubsub.chunks import chunk_ack_ids, whole_seconds
from mandrill.sources.pubsub.clients import DEFAULT_REQUEST_TIMEOUT, Clients, open_clients
from mandrill.sources.pubsub.dead_letter import (
    MESSAGE_ID_ATTRIBUTE,
    REASON_ATTRIBUTE,
    dead_letter_message,
)
from mandrill.sources.pubsub.errors import DEFAULT_RETRY, PubSubError, call_with_retries
from mandrill.sources.pubsub.names import subscription_path, topic_path
from mandrill.sources.pubsub.topic import publish_messages, topic_exists

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Attributes a dead-lettered message carries besides its own.
DEAD_LETTER_REASON_ATTRIBUTE: Final = REASON_ATTRIBUTE
DEAD_LETTER_MESSAGE_ID_ATTRIBUTE: Final = MESSAGE_ID_ATTRIBUTE

#: Client-side limit of one pull. Keep it longer than the server holds an empty pull (the
#: emulator: ~90 s), so that pulls end by the server's answer: the emulator does not notice
#: a pull its client gave up on, and hands messages whose lease expired to that dead pull,
#: which delays their redelivery by another ack deadline each time (measured: 30 s instead
#: of 10 s with 1 s client timeouts). Cancelling a pull has the same cost, once.
DEFAULT_PULL_WAIT: Final = 100.0

_NOT_FOUND: Final = 404


def _to_delivery(message: SubscriberMessage) -> Delivery:
    attempt = message.delivery_attempt
    attributes = message.attributes  # the API omits absent attributes, and empty data
    return Delivery(
        message.ack_id,
        message.message_id,
        message.data or b"",
        {str(k): str(v) for k, v in attributes.items()} if attributes else {},
        message.publish_time.timestamp(),
        int(attempt) if attempt is not None else None,
    )


# -- the source -----------------------------------------------------------------------------


class PubSubSource:
    """A Pub/Sub subscription as a :class:`~mandrill.sources.base.Source`.

    Made by :func:`open_pubsub_source`, valid inside it only. Every method can block on
    the network for a request timeout plus the retry policy's ``total`` (or the outage's
    limit, whichever comes first), raises :class:`PubSubError` once a failure is permanent
    or retries are exhausted, and is cancelled cleanly (an interrupted request is aborted;
    Pub/Sub settlement is idempotent, so a settlement cancelled half-way can simply be sent
    again). Every call reports to one :class:`~mandrill.outage.Outage`, which
    :meth:`problem` reads for the readiness probe.
    """

    def __init__(
        self,
        *,
        bridge: AsyncioBridge,
        clients: Clients,
        subscription: str,
        dead_letter_topic: str | None,
        ack_deadline: float,
        retry: RetryPolicy,
        pull_wait: float,
        request_timeout: float,
        outage: Outage,
        on_transient_error: Callable[[str, BaseException, float], None] | None = None,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
    ) -> None:
        self.subscription = subscription
        self.outage = outage
        self._sleep = sleep
        self._on_transient_error = on_transient_error
        self.dead_letter_topic = dead_letter_topic
        self.keeps_dead_letters = dead_letter_topic is not None
        self.ack_deadline = ack_deadline
        self.retry = retry
        self._bridge = bridge
        self._clients = clients
        self._pull_wait = whole_seconds(pull_wait)
        self._request_timeout = whole_seconds(request_timeout)

    async def pull(self, max_messages: int) -> list[Delivery]:
        """Wait for up to ``max_messages`` deliveries (at most 1000 per call, the API's
        limit); ``[]`` when the server ends an empty long poll (the emulator after ~90 s) or
        ``pull_wait`` passes. To stop waiting sooner, cancel the call (see
        ``DEFAULT_PULL_WAIT`` for what that costs)."""
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        count = min(max_messages, MAX_PULL_MESSAGES)
        messages = await self._call(
            f"pull from {self.subscription}", functools.partial(self._pull_attempt, count)
        )
        return [_to_delivery(m) for m in messages]

    def problem(self) -> str | None:
        """Why Pub/Sub is unavailable (an outage under way), for readiness; else ``None``."""
        return self.outage.problem()

    async def _pull_attempt(self, count: int) -> list[SubscriberMessage]:
        if self.outage.ongoing:
            # A pull is a long poll, answered when messages come (the emulator: after ~90 s
            # when none do): it would see the outage's end that late. A request answered
            # at once sees it as it happens, and readiness comes back with it.
            await self._bridge.call(
                functools.partial(
                    self._clients.subscriber.get_subscription,
                    self.subscription,
                    timeout=self._request_timeout,
                )
            )
            self.outage.succeeded()
        return await self._bridge.call(self._pull_once, count)

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
            await self._call_bridged(
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
            await self._call_bridged(
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
        ``mandrill_dead_letter_reason`` and ``mandrill_original_message_id`` added, cut to
        Pub/Sub's limits (:mod:`~mandrill.sources.pubsub.dead_letter`); does nothing
        without a dead-letter topic. The caller still settles the delivery. A retried
        publish may land twice. Raises :class:`PubSubError` if it could not publish."""
        if self.dead_letter_topic is None:
            await anyio.lowlevel.checkpoint()
            return
        await publish_messages(
            self._bridge,
            self._clients.publisher,
            self.dead_letter_topic,
            [dead_letter_message(delivery.data, delivery.attributes, reason,
                                 delivery.message_id)],
            self.retry,
            self._request_timeout,
            outage=self.outage,
            sleep=self._sleep,
        )

    async def _call_bridged(self, what: str, fn: Callable[..., Awaitable[T]]) -> T:
        """``fn()`` on the asyncio bridge, with retries."""
        return await self._call(what, functools.partial(self._bridge.call, fn))

    async def _call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        return await call_with_retries(
            what,
            attempt,
            self.retry,
            on_transient_error=self._on_transient_error,
            outage=self.outage,
            sleep=self._sleep,
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
    emulator_host: str | None = None,
    on_transient_error: Callable[[str, BaseException, float], None] | None = None,
    outage: Outage | None = None,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
) -> AsyncIterator[PubSubSource]:
    """Open ``subscription`` (a name in ``project``, or a full path) for pulling.

    ``backend`` is the one given to ``anyio.run``; on trio the clients run behind an
    asyncio bridge, this one's own unless ``bridge`` is given (then it is shared, not
    closed). ``api_root`` overrides the endpoint, used with credentials (a regional one, say);
    ``emulator_host`` names an emulator, used without (else ``PUBSUB_EMULATOR_HOST`` or the
    real service). Every call, from the first, reports to ``outage`` (one of its own if not
    given): give one whose :meth:`~mandrill.outage.Outage.problem` the readiness probe
    reads, and Pub/Sub unreachable at start shows there while this retries. Reads the
    subscription's ack deadline first: raises :class:`PubSubError` (status 404) if the
    subscription does not exist, or as any call does; and
    :class:`~mandrill.errors.ConfigError` if the dead-letter topic does not. Retries wait
    with ``sleep`` (a test's sees the waits).
    Closing closes the clients' aiohttp session, shielded but bounded by ``CLOSE_SECONDS``.
    """
    path = subscription_path(project, subscription)
    outage = outage if outage is not None else Outage("Pub/Sub")
    dead_letter_path = topic_path(project, dead_letter_topic) if dead_letter_topic else None
    async with open_clients(backend, bridge, api_root, emulator_host) as (bridge, clients):
        what = f"get subscription {path}"
        try:
            info = await call_with_retries(
                what,
                functools.partial(
                    bridge.call,
                    functools.partial(
                        clients.subscriber.get_subscription,
                        path,
                        timeout=whole_seconds(request_timeout),
                    ),
                ),
                retry,
                on_transient_error=on_transient_error,
                outage=outage,
                sleep=sleep,
            )
        except PubSubError as exc:
            if exc.status == _NOT_FOUND:
                raise PubSubError(f"subscription {path} not found", status=exc.status) from None
            raise
        if dead_letter_path is not None:
            exists = await topic_exists(
                bridge, clients.publisher, dead_letter_path, retry, request_timeout, outage
            )
            if exists is False:
                raise ConfigError(
                    f"dead-letter topic {dead_letter_path} does not exist (mandrill setup"
                    " --dead-letter-topic creates it)"
                )
            if exists is None:
                log.warning("cannot check that dead-letter topic %s exists: this account"
                            " may publish to it but not read it (roles/pubsub.viewer)",
                            dead_letter_path)
        yield PubSubSource(
            bridge=bridge,
            clients=clients,
            subscription=path,
            dead_letter_topic=dead_letter_path,
            ack_deadline=float(info.get("ackDeadlineSeconds", 10)),
            retry=retry,
            pull_wait=pull_wait,
            request_timeout=request_timeout,
            outage=outage,
            on_transient_error=on_transient_error,
            sleep=sleep,
        )


if TYPE_CHECKING:

    def _implements(source: PubSubSource) -> Source:
        return source  # mypy checks it against the protocol here
