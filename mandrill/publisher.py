"""The talk's publisher: chaos messages naming random ``cattle-xxxx`` instances."""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping

import anyio

from mandrill.message import encode_payload
from mandrill.sources.base import Topic
from mandrill.sources.limits import MAX_PUBLISH_MESSAGES

_ALPHABET = string.ascii_lowercase + string.digits
#: One publish request's worth of messages.
MAX_BATCH = MAX_PUBLISH_MESSAGES


def random_instance_name(rng: random.Random) -> str:
    return "cattle-" + "".join(rng.choices(_ALPHABET, k=4))


async def publish_chaos(
    topic: Topic,
    *,
    count: int | None,
    rate: float | None,
    rng: random.Random,
    attributes: Mapping[str, str] | None = None,
    on_published: Callable[[int], None] | None = None,
) -> int:
    """Publish ``count`` messages (forever if ``None``) at ``rate`` per second (as fast as
    the topic takes them if ``None``); returns how many were published.

    Pacing is by a schedule, not per-message sleeps, so high rates go out in batches.
    Runs until done or cancelled.
    """
    attrs = dict(attributes or {})
    published = 0
    started = anyio.current_time()
    while count is None or published < count:
        if rate is None:
            due = MAX_BATCH
        else:
            due = int((anyio.current_time() - started) * rate) + 1 - published
            if due <= 0:
                await anyio.sleep((published + 1) / rate - (anyio.current_time() - started))
                continue
        batch = min(due, MAX_BATCH, count - published if count is not None else MAX_BATCH)
        await topic.publish(
            [(encode_payload(random_instance_name(rng)), attrs) for _ in range(batch)]
        )
        published += batch
        if on_published is not None:
            on_published(batch)
    return published
