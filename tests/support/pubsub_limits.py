"""Pub/Sub's publish limits, as the real service enforces them and the emulator does not
(it takes 101 attributes, or a 2 KB attribute value, without a word): a refusal for
:class:`~tests.support.holding_proxy.HoldingProxy` that answers such a publish with the
service's HTTP 400, so that tests see what production would do.

See https://cloud.google.com/pubsub/quotas#resource_limits.
"""

from __future__ import annotations

import base64
import json

from mandrill.sources.limits import (
    MAX_ATTRIBUTE_KEY_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES,
    MAX_PUBLISH_REQUEST_BYTES,
)


def violation(body: dict[str, object], size: int) -> str | None:
    """What about a publish request's JSON ``body`` (``size`` bytes) real Pub/Sub refuses."""
    if size > MAX_PUBLISH_REQUEST_BYTES:
        return f"request size {size} exceeds the limit"
    for message in body.get("messages", []):  # type: ignore[attr-defined]
        attributes = message.get("attributes") or {}
        if len(attributes) > MAX_ATTRIBUTES:
            return f"message has {len(attributes)} attributes, more than {MAX_ATTRIBUTES}"
        for key, value in attributes.items():
            if len(key.encode()) > MAX_ATTRIBUTE_KEY_BYTES:
                return f"attribute key {key[:20]!r}... is longer than {MAX_ATTRIBUTE_KEY_BYTES}"
            if key.startswith("goog"):
                return f"attribute key {key!r} uses the reserved prefix 'goog'"
            if len(value.encode()) > MAX_ATTRIBUTE_VALUE_BYTES:
                return f"attribute {key!r} value is longer than {MAX_ATTRIBUTE_VALUE_BYTES}"
        if not message.get("data") and not attributes:
            return "message has neither data nor attributes"
        base64.b64decode(message.get("data") or "")
    return None


def refuse_over_limits(method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
    """A ``HoldingProxy`` refusal: HTTP 400 INVALID_ARGUMENT, as Pub/Sub answers it, for a
    publish that breaks a limit; ``None`` (forward it) for everything else."""
    if method != "POST" or not path.endswith(":publish"):
        return None
    problem = violation(json.loads(body or b"{}"), len(body))
    if problem is None:
        return None
    error = {"error": {"code": 400, "message": problem, "status": "INVALID_ARGUMENT"}}
    return 400, json.dumps(error).encode()
