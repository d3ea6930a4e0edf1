"""Groups of hosts (``--group-by``), pure: the two forms, their errors, a message's group."""

from __future__ import annotations

import pytest

from mandrill.grouping import NO_GROUP, GroupLimit, parse_group_by
from mandrill.message import Message

ZONE = r"pattern:^[^.]+\.([^.]+)\."


def host(hostname: str, **attributes: str) -> Message:
    return Message("m1", hostname.split(".")[0], hostname, 0.0, 1, attributes)


def test_by_attribute():
    by = parse_group_by("attribute:zone")
    assert by.group_of(host("web-1.example.net", zone="us-east1-b")) == "us-east1-b"
    assert by.group_of(host("web-1.example.net")) == NO_GROUP
    assert by.group_of(host("web-1.example.net", zone="")) == NO_GROUP
    assert str(by) == "attribute:zone"
    assert parse_group_by(str(by)) == by


def test_by_host_name_pattern():
    by = parse_group_by(ZONE)
    assert by.group_of(host("web-1.us-east1-b.example.net")) == "us-east1-b"
    assert by.group_of(host("web-1")) == NO_GROUP  # no match
    assert parse_group_by(r"pattern:^(x)?web").group_of(host("web-1.a.example.net")) == NO_GROUP
    assert str(by) == ZONE
    assert parse_group_by(str(by)) == by


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("zone", "'zone' is not attribute:NAME or pattern:REGEX"),
        ("label:zone", "is not attribute:NAME or pattern:REGEX"),
        ("attribute:", "an attribute name, without spaces, must follow 'attribute:'"),
        ("attribute:a b", "an attribute name, without spaces"),
        ("attribute:" + "k" * 257, "attribute name is over 256 bytes"),
        ("pattern:([a-z]", "pattern '([a-z]' is not a regular expression: missing )"),
        ("pattern:web", "pattern 'web' has 0 capture groups: it needs exactly one"),
        ("pattern:(a)(b)", "has 2 capture groups"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, error):
    with pytest.raises(ValueError, match=r"^[^\n]+$") as caught:
        parse_group_by(spec)
    assert error in str(caught.value)


def test_what_a_held_message_says():
    limit = GroupLimit(parse_group_by("attribute:zone"), 2)
    assert limit.held_detail("b", 2) == (
        "group 'b' at its limit: 2 restarts under way (limit 2 per group)"
    )
    assert limit.held_detail("", 2).startswith("the hosts of no group (by attribute:zone)")
