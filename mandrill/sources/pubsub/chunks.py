"""Pub/Sub requests sized to the API's limits (:mod:`mandrill.sources.limits`): ack ids and
messages split into request-sized chunks, attribute values and timeouts made acceptable."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

from mandrill.sources.limits import (
    MAX_ACK_IDS_PER_REQUEST,
    MAX_ACK_REQUEST_BYTES,
    MAX_PUBLISH_MESSAGES,
    MAX_PUBLISH_REQUEST_BYTES,
)

Item = TypeVar("Item")


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


def truncate_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, marked with ``...`` if cut."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "..."


def whole_seconds(seconds: float) -> int:
    """A timeout for gcloud-aio, which types its timeouts as int: at least 1 s."""
    return max(1, math.ceil(seconds))
