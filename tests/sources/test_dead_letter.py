"""A dead letter as Pub/Sub will take it (pure): mandrill's attributes always there, the
message's own cut to the service's limits, what was cut named."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mandrill.sources.limits import (
    MAX_ATTRIBUTE_KEY_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES,
    MAX_PUBLISH_REQUEST_BYTES,
)
from mandrill.sources.pubsub.chunks import message_size
from mandrill.sources.pubsub.dead_letter import (
    CUT_ATTRIBUTE,
    DATA_CUT_ATTRIBUTE,
    MESSAGE_ID_ATTRIBUTE,
    REASON_ATTRIBUTE,
    dead_letter_message,
)


def test_a_message_that_fits_keeps_everything() -> None:
    data, attributes = dead_letter_message(b"{not json", {"origin": "test"}, "invalid", "m-1")
    assert data == b"{not json"
    assert attributes == {"origin": "test", REASON_ATTRIBUTE: "invalid",
                          MESSAGE_ID_ATTRIBUTE: "m-1"}


def test_99_attributes_and_mandrills_two_keep_97_and_name_the_rest() -> None:
    own = {f"key-{n:02d}": "x" for n in range(99)}
    _, attributes = dead_letter_message(b"x", own, "invalid", "m-1")
    assert len(attributes) == MAX_ATTRIBUTES
    assert attributes[CUT_ATTRIBUTE] == "key-97,key-98"
    assert all(f"key-{n:02d}" in attributes for n in range(97))


def test_keys_pubsub_refuses_are_cut_and_long_values_shortened() -> None:
    own = {"goog-reserved": "1", "k" * 300: "2", "long": "v" * 2000, "ok": "3"}
    _, attributes = dead_letter_message(b"x", own, "r" * 5000, "m-1")
    assert attributes[CUT_ATTRIBUTE] == ",".join(sorted(["goog-reserved", "k" * 300, "long"]))
    assert len(attributes["long"].encode()) <= MAX_ATTRIBUTE_VALUE_BYTES
    assert attributes["ok"] == "3"
    assert len(attributes[REASON_ATTRIBUTE].encode()) <= MAX_ATTRIBUTE_VALUE_BYTES


def test_mandrills_own_names_in_the_message_are_not_taken_for_its_own() -> None:
    _, attributes = dead_letter_message(b"x", {REASON_ATTRIBUTE: "forged"}, "invalid", "m-1")
    assert attributes[REASON_ATTRIBUTE] == "invalid"
    assert attributes[CUT_ATTRIBUTE] == REASON_ATTRIBUTE


def test_data_too_big_for_a_request_is_shortened_and_said_so() -> None:
    data = b"x" * (MAX_PUBLISH_REQUEST_BYTES)
    kept, attributes = dead_letter_message(data, {}, "invalid", "m-1")
    assert message_size((kept, attributes)) <= MAX_PUBLISH_REQUEST_BYTES
    assert data.startswith(kept)
    assert attributes[DATA_CUT_ATTRIBUTE] == (
        f"kept {len(kept)} of {len(data)} bytes; the ledger has all"
    )


@given(
    st.dictionaries(st.text(min_size=1, max_size=300), st.text(max_size=1500), max_size=130),
    st.text(max_size=3000),
)
def test_whatever_the_message_carries_the_dead_letter_fits(
    own: dict[str, str], reason: str
) -> None:
    data, attributes = dead_letter_message(b"payload", own, reason, "m-1")
    assert data == b"payload"
    assert len(attributes) <= MAX_ATTRIBUTES
    assert REASON_ATTRIBUTE in attributes
    assert attributes[MESSAGE_ID_ATTRIBUTE] == "m-1"
    for key, value in attributes.items():
        assert len(key.encode()) <= MAX_ATTRIBUTE_KEY_BYTES
        assert not key.startswith("goog")
        assert len(value.encode()) <= MAX_ATTRIBUTE_VALUE_BYTES
    dropped = set(own) - set(attributes)
    if dropped or len(attributes) < len(own):
        assert CUT_ATTRIBUTE in attributes
