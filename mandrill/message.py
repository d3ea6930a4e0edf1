"""Deliveries as a source hands them out, and the validated message inside (pure, no I/O)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from mandrill.errors import InvalidMessage, one_line

_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})
#: Payloads above this size are rejected before JSON parsing (Pub/Sub's own limit is 10 MB).
MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_DOMAIN = "example.net"

# RFC 1123 label: letters, digits and inner hyphens, 1 to 63 characters.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE | re.ASCII)
_MAX_HOSTNAME = 253
#: The wire form of :func:`encode_payload`, which every publisher sends: read without the
#: JSON decoder (which costs twice as much on a payload this small). The name has no
#: escapes and no quotes, so what it captures is exactly what ``json.loads`` would return;
#: anything else goes through the decoder.
_WIRE_FORM = re.compile(rb'\{"instance_name": "([A-Za-z0-9-]{1,63})"\}')


class Delivery(NamedTuple):
    """One delivery of a message: what a worker needs to parse it and to settle it.

    ``delivery_attempt`` is ``None`` when the source does not count deliveries (Pub/Sub
    without a dead-letter policy). A NamedTuple, as :class:`Message`: immutable, and built
    without a setattr call per field (a frozen dataclass's way: ~2k instructions each).
    """

    ack_id: str
    message_id: str
    data: bytes
    attributes: Mapping[str, str]
    #: When the message was published, in epoch seconds (converted once, by the source).
    publish_time: float
    delivery_attempt: int | None = None


class Message(NamedTuple):
    """A validated chaos message: which host to restart."""

    message_id: str
    instance_name: str
    hostname: str
    #: Epoch seconds.
    publish_time: float
    delivery_attempt: int | None
    attributes: Mapping[str, str] = _NO_ATTRIBUTES
    data: bytes = b""


def is_valid_label(label: str) -> bool:
    """True if ``label`` is one RFC 1123 hostname label."""
    # fullmatch: "$" alone would also accept a trailing newline.
    return bool(_LABEL.fullmatch(label))


def validate_domain(domain: str) -> str:
    """Return ``domain`` lower-cased if it is an RFC 1123 name, else raise ``ValueError``."""
    labels = domain.split(".")
    if not domain or len(domain) > _MAX_HOSTNAME - 2 or not all(map(is_valid_label, labels)):
        raise ValueError(f"{domain!r} is not a valid DNS domain (RFC 1123)")
    return domain.lower()


def parse_delivery(delivery: Delivery, domain: str = DEFAULT_DOMAIN) -> Message:
    """Validate a delivery's payload and build its :class:`Message`.

    Raises :class:`InvalidMessage` with a one-line reason for anything that is not a JSON
    object with a string ``instance_name`` that is one RFC 1123 label.
    """
    data = delivery.data
    wire = _WIRE_FORM.fullmatch(data)
    if wire is not None:
        return _message(delivery, wire.group(1).decode("ascii"), domain)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidMessage(f"payload too large ({len(data)} bytes > {MAX_PAYLOAD_BYTES})")
    try:
        payload = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int too long, ...
        raise InvalidMessage(f"payload is not JSON: {one_line(str(exc))}") from None
    except RecursionError:
        raise InvalidMessage("payload is not JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise InvalidMessage(f"payload is a JSON {type(payload).__name__}, not an object")
    instance_name = payload.get("instance_name")
    if instance_name is None:
        raise InvalidMessage("payload has no 'instance_name'")
    if not isinstance(instance_name, str):
        raise InvalidMessage(f"'instance_name' is a {type(instance_name).__name__}, not a string")
    return _message(delivery, instance_name, domain)


def _message(delivery: Delivery, instance_name: str, domain: str) -> Message:
    if not is_valid_label(instance_name):
        raise InvalidMessage(
            f"'instance_name' {_preview(instance_name)} is not a valid host label (RFC 1123)"
        )
    hostname = f"{instance_name.lower()}.{domain}"
    if len(hostname) > _MAX_HOSTNAME:
        raise InvalidMessage(f"hostname {_preview(hostname)} is longer than {_MAX_HOSTNAME}")
    return Message(
        message_id=delivery.message_id,
        instance_name=instance_name,
        hostname=hostname,
        publish_time=delivery.publish_time,
        delivery_attempt=delivery.delivery_attempt,
        attributes=delivery.attributes,
        data=delivery.data,
    )


def encode_payload(instance_name: str) -> bytes:
    """The wire form every publisher uses; readable by any Pub/Sub client."""
    return json.dumps({"instance_name": instance_name}).encode()


def _preview(text: str, limit: int = 60) -> str:
    shown = text if len(text) <= limit else text[:limit] + "…"
    return repr(shown)


