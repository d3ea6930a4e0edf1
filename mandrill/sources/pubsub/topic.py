"""A Pub/Sub topic as a :class:`~mandrill.sources.base.Topic`, and the publishing that the
topic and the source's dead-lettering share."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

import anyio
from gcloud.aio.pubsub import PublisherClient, PubsubMessage

from mandrill.outage import Outage
from mandrill.retry import RetryPolicy
from mandrill.sources.base import Topic
from mandrill.sources.bridge import AsyncioBridge
from mandrill.sources.pubsub.chunks import chunk_messages, whole_seconds
from mandrill.sources.pubsub.clients import DEFAULT_REQUEST_TIMEOUT, Clients, open_clients
from mandrill.sources.pubsub.errors import DEFAULT_RETRY, PubSubError, call_with_retries
from mandrill.sources.pubsub.names import topic_path


async def publish_messages(
    bridge: AsyncioBridge,
    publisher: PublisherClient,
    topic: str,
    messages: Sequence[tuple[bytes, Mapping[str, str]]],
    policy: RetryPolicy,
    request_timeout: float,
    outage: Outage | None = None,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
) -> list[str]:
    """Publish ``messages`` in request-sized chunks, one after another; their ids in order.
    Each request reports to ``outage``, if given, and retries wait with ``sleep`` (see
    :func:`call_with_retries`)."""
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
                publisher.publish, topic, body, timeout=whole_seconds(request_timeout)
            ),
        )
        response = await call_with_retries(
            f"publish to {topic}", attempt, policy, outage=outage, sleep=sleep
        )
        chunk_ids = [str(i) for i in response.get("messageIds", [])]
        if len(chunk_ids) != len(chunk):
            raise PubSubError(
                f"publish to {topic}: got {len(chunk_ids)} message ids for {len(chunk)} messages"
            )
        ids.extend(chunk_ids)
    return ids


async def topic_exists(
    bridge: AsyncioBridge,
    publisher: PublisherClient,
    topic: str,
    policy: RetryPolicy,
    request_timeout: float,
    outage: Outage | None = None,
) -> bool | None:
    """Whether ``topic`` exists; ``None`` if this account may not ask (HTTP 403: a
    least-privilege account holds ``roles/pubsub.publisher`` on a topic, which publishes
    but does not read it). Raises :class:`PubSubError` like every call."""

    async def get() -> None:
        # gcloud-aio has no get_topic: its own request, as its list_topics makes it.
        url = f"{publisher._api_root}/{topic}"
        headers = await publisher._headers()
        response = await publisher.session.get(
            url, headers=headers, timeout=whole_seconds(request_timeout)
        )
        await response.read()  # released to the pool, not to the garbage collector

    try:
        await call_with_retries(
            f"get topic {topic}", functools.partial(bridge.call, get), policy, outage=outage
        )
    except PubSubError as exc:
        if exc.status == _NOT_FOUND:
            return False
        if exc.status == _FORBIDDEN:
            return None
        raise
    return True


_NOT_FOUND: Final = 404
_FORBIDDEN: Final = 403


class PubSubTopic:
    """A Pub/Sub topic as a :class:`~mandrill.sources.base.Topic`; made by
    :func:`open_pubsub_topic`, valid inside it only."""

    def __init__(
        self,
        *,
        bridge: AsyncioBridge,
        clients: Clients,
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
        return await publish_messages(
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
    emulator_host: str | None = None,
) -> AsyncIterator[PubSubTopic]:
    """Open ``topic`` (a name in ``project``, or a full path) for publishing; no request is
    made until the first publish (a missing topic raises :class:`PubSubError` there).
    ``backend``, ``bridge``, ``api_root`` and ``emulator_host`` are as for
    :func:`open_pubsub_source`."""
    async with open_clients(backend, bridge, api_root, emulator_host) as (bridge, clients):
        yield PubSubTopic(
            bridge=bridge,
            clients=clients,
            topic=topic_path(project, topic),
            retry=retry,
            request_timeout=request_timeout,
        )


if TYPE_CHECKING:

    def _implements(topic: PubSubTopic) -> Topic:
        return topic  # mypy checks it against the protocol here
