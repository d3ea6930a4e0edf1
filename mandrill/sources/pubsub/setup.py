"""``mandrill setup``: create the topic, subscription and dead-letter topic, keeping
whatever already exists."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from mandrill.retry import RetryPolicy
from mandrill.sources.bridge import AsyncioBridge
from mandrill.sources.pubsub.chunks import whole_seconds
from mandrill.sources.pubsub.clients import DEFAULT_REQUEST_TIMEOUT, open_clients
from mandrill.sources.pubsub.errors import DEFAULT_RETRY, PubSubError, call_with_retries
from mandrill.sources.pubsub.names import subscription_path, topic_path

_ALREADY_EXISTS: Final = 409


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
    emulator_host: str | None = None,
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
    timeout = whole_seconds(DEFAULT_REQUEST_TIMEOUT)
    report: list[str] = []
    async with open_clients(backend, bridge, api_root, emulator_host) as (bridge, clients):

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


