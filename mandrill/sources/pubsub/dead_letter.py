"""A dead letter as Pub/Sub will take it: the message's data and attributes, with
mandrill's own (why, and which message it was), cut to the service's limits.

A message that came from Pub/Sub fits its limits, but not always once mandrill's attributes
are added (99 of its own and 2 more are over the limit of 100: HTTP 400), and not a payload
that only the ledger kept. What must go is cut, never the reason, and named in
:data:`CUT_ATTRIBUTE`: the ledger keeps the message whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from mandrill.sources.limits import (
    MAX_ATTRIBUTE_KEY_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES,
    MAX_PUBLISH_REQUEST_BYTES,
    RESERVED_ATTRIBUTE_PREFIX,
)
from mandrill.sources.pubsub.chunks import message_size, truncate_utf8

#: Attributes a dead-lettered message carries besides its own.
REASON_ATTRIBUTE: Final = "mandrill_dead_letter_reason"
MESSAGE_ID_ATTRIBUTE: Final = "mandrill_original_message_id"
#: The keys of the message's own attributes that were dropped or shortened, comma-separated.
CUT_ATTRIBUTE: Final = "mandrill_attributes_cut"
#: Set when the data itself had to be shortened: how much of it is kept.
DATA_CUT_ATTRIBUTE: Final = "mandrill_data_cut"
_OURS = (REASON_ATTRIBUTE, MESSAGE_ID_ATTRIBUTE, CUT_ATTRIBUTE, DATA_CUT_ATTRIBUTE)


def dead_letter_message(
    data: bytes, attributes: Mapping[str, str], reason: str, message_id: str
) -> tuple[bytes, dict[str, str]]:
    """``(data, attributes)`` to publish for a dead letter, within Pub/Sub's limits."""
    ours = {
        REASON_ATTRIBUTE: truncate_utf8(reason, MAX_ATTRIBUTE_VALUE_BYTES),
        MESSAGE_ID_ATTRIBUTE: truncate_utf8(message_id, MAX_ATTRIBUTE_VALUE_BYTES),
    }
    cut: list[str] = []
    fitting: dict[str, str] = {}
    for key, value in attributes.items():
        if (
            key in _OURS
            or len(key.encode()) > MAX_ATTRIBUTE_KEY_BYTES
            or key.startswith(RESERVED_ATTRIBUTE_PREFIX)
        ):
            cut.append(key)
            continue
        kept_value = truncate_utf8(value, MAX_ATTRIBUTE_VALUE_BYTES)
        if kept_value != value:
            cut.append(key)
        fitting[key] = kept_value
    room = MAX_ATTRIBUTES - len(ours)
    if cut or len(fitting) > room:
        room -= 1  # for the attribute that names what was cut
    kept = dict(list(fitting.items())[:room])
    cut += [key for key in fitting if key not in kept]
    if cut:
        named = ",".join(sorted(set(cut)))
        kept[CUT_ATTRIBUTE] = truncate_utf8(named, MAX_ATTRIBUTE_VALUE_BYTES)
    kept.update(ours)
    return _fit_data(data, kept), kept


def _fit_data(data: bytes, attributes: dict[str, str]) -> bytes:
    """``data``, shortened (and said so in ``attributes``) if the request would be too big."""
    if message_size((data, attributes)) <= MAX_PUBLISH_REQUEST_BYTES:
        return data
    said = "kept {} of {} bytes; the ledger has all"
    # Its size counts too: room made for the longest it can be (kept is no longer).
    attributes[DATA_CUT_ATTRIBUTE] = said.format(len(data), len(data))
    room = MAX_PUBLISH_REQUEST_BYTES - message_size((b"", attributes))
    kept = data[: max(0, room * 3 // 4 - 3)]  # base64 turns 3 bytes into 4
    attributes[DATA_CUT_ATTRIBUTE] = said.format(len(kept), len(data))
    return kept


__all__ = [
    "CUT_ATTRIBUTE", "DATA_CUT_ATTRIBUTE", "MESSAGE_ID_ATTRIBUTE", "REASON_ATTRIBUTE",
    "dead_letter_message",
]
