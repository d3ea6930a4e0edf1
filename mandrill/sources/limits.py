"""Google Cloud Pub/Sub's API limits: the one place that states them.

Pure (no imports), so that the daemon (``service.py``, ``lease.py``) can size its requests
without loading the Pub/Sub adapter and its HTTP client.
See https://cloud.google.com/pubsub/quotas#resource_limits.
"""

from __future__ import annotations

from typing import Final

#: Messages one pull returns at most.
MAX_PULL_MESSAGES: Final = 1000
#: Ack ids one acknowledge or modifyAckDeadline request takes at most.
MAX_ACK_IDS_PER_REQUEST: Final = 2500
#: A settlement request must stay under 512 KB; ack ids are opaque and ~200 bytes on the
#: real service, so 2500 of them can exceed it: keep well clear of the limit.
MAX_ACK_REQUEST_BYTES: Final = 384 * 1024
#: Messages one publish request takes at most.
MAX_PUBLISH_MESSAGES: Final = 1000
#: A publish request must stay under 10 MB (base64 included); leave room for the envelope.
MAX_PUBLISH_REQUEST_BYTES: Final = 9_000_000
#: The longest lease (ack deadline) one request may ask for.
MAX_ACK_DEADLINE_SECONDS: Final = 600
#: The shortest and longest ack deadline a subscription may have.
MIN_SUBSCRIPTION_ACK_DEADLINE: Final = 10
MAX_SUBSCRIPTION_ACK_DEADLINE: Final = 600
#: Attributes one message may carry, and the bytes of each one's key and value.
MAX_ATTRIBUTES: Final = 100
MAX_ATTRIBUTE_KEY_BYTES: Final = 256
MAX_ATTRIBUTE_VALUE_BYTES: Final = 1024
#: Attribute keys may not start with this (Google's own).
RESERVED_ATTRIBUTE_PREFIX: Final = "goog"
