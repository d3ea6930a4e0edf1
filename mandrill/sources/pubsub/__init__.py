"""Google Cloud Pub/Sub as a :class:`~mandrill.sources.base.Source` and a
:class:`~mandrill.sources.base.Topic`, on gcloud-aio-pubsub's REST clients.

One module per concern: ``errors`` (what failed, and retries), ``chunks`` (requests sized
to the API's limits, stated in :mod:`mandrill.sources.limits`), ``names`` (resource paths),
``clients`` (their lifetime, on the asyncio bridge), ``source``, ``topic`` and ``setup``.
Import from here; the modules may move.
"""

from mandrill.google_cloud import describe_error, http_status, is_transient
from mandrill.retry import RetryPolicy, backoff_delays
from mandrill.sources.limits import (
    MAX_ACK_DEADLINE_SECONDS,
    MAX_ACK_IDS_PER_REQUEST,
    MAX_ACK_REQUEST_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_PUBLISH_MESSAGES,
    MAX_PUBLISH_REQUEST_BYTES,
    MAX_PULL_MESSAGES,
)
from mandrill.sources.pubsub.chunks import chunk_ack_ids, chunk_messages, chunked
from mandrill.sources.pubsub.clients import (
    CLOSE_SECONDS,
    DEFAULT_REQUEST_TIMEOUT,
    PUBSUB_SCOPES,
    uses_credentials,
)
from mandrill.sources.pubsub.errors import (
    DEFAULT_RETRY,
    OUTAGE_RETRY,
    PubSubError,
    call_with_retries,
)
from mandrill.sources.pubsub.names import subscription_path, topic_path
from mandrill.sources.pubsub.setup import setup_pubsub
from mandrill.sources.pubsub.source import (
    DEAD_LETTER_MESSAGE_ID_ATTRIBUTE,
    DEAD_LETTER_REASON_ATTRIBUTE,
    DEFAULT_PULL_WAIT,
    PubSubSource,
    open_pubsub_source,
)
from mandrill.sources.pubsub.topic import PubSubTopic, open_pubsub_topic

__all__ = [
    "CLOSE_SECONDS",
    "DEAD_LETTER_MESSAGE_ID_ATTRIBUTE",
    "DEAD_LETTER_REASON_ATTRIBUTE",
    "DEFAULT_PULL_WAIT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_RETRY",
    "MAX_ACK_DEADLINE_SECONDS",
    "MAX_ACK_IDS_PER_REQUEST",
    "MAX_ACK_REQUEST_BYTES",
    "MAX_ATTRIBUTE_VALUE_BYTES",
    "MAX_PUBLISH_MESSAGES",
    "MAX_PUBLISH_REQUEST_BYTES",
    "MAX_PULL_MESSAGES",
    "OUTAGE_RETRY",
    "PUBSUB_SCOPES",
    "PubSubError",
    "PubSubSource",
    "PubSubTopic",
    "RetryPolicy",
    "backoff_delays",
    "call_with_retries",
    "chunk_ack_ids",
    "chunk_messages",
    "chunked",
    "describe_error",
    "http_status",
    "is_transient",
    "open_pubsub_source",
    "open_pubsub_topic",
    "setup_pubsub",
    "subscription_path",
    "topic_path",
    "uses_credentials",
]
