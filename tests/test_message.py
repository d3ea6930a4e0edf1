import json
import string
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mandrill.errors import InvalidMessage
from mandrill.message import (
    MAX_PAYLOAD_BYTES,
    Delivery,
    encode_payload,
    is_valid_label,
    parse_delivery,
    validate_domain,
)

NOW = datetime(2026, 11, 24, tzinfo=UTC).timestamp()


def delivery(data: bytes, attempt: int | None = 1) -> Delivery:
    return Delivery("ack-1", "m-1", data, {"k": "v"}, NOW, attempt)


def test_valid_message_builds_hostname():
    message = parse_delivery(delivery(encode_payload("cattle-ab12")), "fleet.example.org")
    assert message.instance_name == "cattle-ab12"
    assert message.hostname == "cattle-ab12.fleet.example.org"
    assert message.message_id == "m-1"
    assert message.delivery_attempt == 1
    assert message.attributes == {"k": "v"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b"{}", "no 'instance_name'"),
        (b'{"instance_name": 7}', "is a int, not a string"),
        (b'{"instance_name": "; rm -rf /"}', "not a valid host label"),
        (b'{"instance_name": "../etc"}', "not a valid host label"),
        (b'{"instance_name": "-leading"}', "not a valid host label"),
        (json.dumps({"instance_name": "a" * 64}).encode(), "not a valid host label"),
        (b"[" * 60_000, "nested too deeply"),
        (b"x" * (MAX_PAYLOAD_BYTES + 1), "too large"),
        (b'{"instance_name": "a", "n": 1' + b"0" * 5000 + b"}", "not JSON"),
        (b'{"instance_name": "cattle-1\\n"}', "not a valid host label"),
    ],
)
def test_invalid_payloads_are_rejected_with_a_reason(data, reason):
    with pytest.raises(InvalidMessage, match=None) as info:
        parse_delivery(delivery(data))
    assert reason in info.value.reason
    assert "\n" not in info.value.reason


@given(st.binary(max_size=300))
def test_any_bytes_either_parse_or_raise_invalid_message(data):
    try:
        message = parse_delivery(delivery(data))
    except InvalidMessage as exc:
        reason = exc.reason
        assert reason
        assert "\n" not in reason
    else:
        assert is_valid_label(message.instance_name)


@given(st.text(max_size=80))
def test_any_instance_name_is_accepted_only_if_a_label(name):
    data = json.dumps({"instance_name": name}).encode()
    try:
        message = parse_delivery(delivery(data))
    except InvalidMessage:
        assert not is_valid_label(name)
    else:
        assert set(message.instance_name) <= set(string.ascii_letters + string.digits + "-")
        assert len(message.instance_name) <= 63


@given(st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z"))
def test_every_rfc1123_label_is_accepted(name):
    assert parse_delivery(delivery(encode_payload(name))).instance_name == name


def test_domain_validation():
    assert validate_domain("Example.NET") == "example.net"
    for bad in ("", "a..b", "-x.com", "a b.com", "x" * 300):
        with pytest.raises(ValueError, match="not a valid DNS domain"):
            validate_domain(bad)


@given(st.text(alphabet=string.ascii_letters + string.digits + "-", max_size=70))
def test_the_wire_form_reads_as_the_json_decoder_would(name):
    """encode_payload's bytes take a path without the JSON decoder; the same object with
    other spacing goes through it: both must decide alike."""
    outcomes = []
    for data in (encode_payload(name), json.dumps({"instance_name": name}, indent=1).encode()):
        try:
            message = parse_delivery(delivery(data))
            outcomes.append((message.instance_name, message.hostname))
        except InvalidMessage as exc:
            outcomes.append(exc.reason)
    assert outcomes[0] == outcomes[1]
