"""What a notification says: its document, body templates, and request headers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mandrill.ledger.breaker import Breaker
from mandrill.message import Message
from mandrill.notification import SAMPLE, BodyTemplate, Notification, parse_header, parse_headers

TIME = datetime(2026, 1, 5, 12, 0, 30, tzinfo=timezone(timedelta(hours=1)))
SLACK = '{"text": "{host}: {outcome} ({detail})"}'
GOOGLE_CHAT = '{"text": "*{outcome}* {host} at {time}: {detail} (message {message_id})"}'


def test_notification_from_a_message():
    message = Message("m-9", "Db-2", "db-2.example.net", TIME.timestamp(), 3)
    made = Notification.for_message(message, "skipped", "host excluded", TIME)
    assert made == Notification("db-2.example.net", "m-9", "skipped", "host excluded", TIME)
    assert json.loads(made.to_json())["time"] == "2026-01-05T12:00:30+01:00"


def test_notification_of_the_breaker():
    breaker = Breaker(3, TIME.timestamp(), "host:1:ab", "4 restarts failed in the last 1h")
    made = Notification.for_breaker(breaker)
    assert made == Notification(
        "", "", "breaker_open",
        "4 restarts failed in the last 1h; every restart waits for `mandrill resume`",
        TIME.astimezone(UTC),
    )
    rendered = json.loads(BodyTemplate(SLACK).render(made))
    assert rendered == {"text": f": breaker_open ({made.detail})"}


def test_naive_time_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        Notification("h", "m", "restarted", "", datetime(2026, 1, 1))


def test_time_is_utc_when_given_in_utc():
    made = Notification("h", "m", "dry_run", "", datetime(2026, 1, 1, tzinfo=UTC))
    assert json.loads(made.to_json())["time"] == "2026-01-01T00:00:00+00:00"


# -- body templates --


def test_a_slack_template():
    body = BodyTemplate(SLACK).render(SAMPLE)
    assert json.loads(body) == {
        "text": 'cattle-ab12.example.net: restarted (exit 0 "quoted" \\ \n)'
    }


def test_a_google_chat_template_with_every_placeholder():
    note = Notification("web-1.example.net", "42", "failed", "exit 1", TIME)
    assert json.loads(BodyTemplate(GOOGLE_CHAT).render(note)) == {
        "text": "*failed* web-1.example.net at 2026-01-05T12:00:30+01:00: exit 1 (message 42)"
    }


def test_placeholders_fill_keys_nested_values_and_leave_the_rest():
    template = BodyTemplate(
        '{"{outcome}": [{"host": "{host}", "n": 1, "ok": true, "none": null}],'
        ' "braces": "{{host}} {{ {{not}} }", "lone": "a { b", "closing": "c } d"}'
    )
    assert json.loads(template.render(SAMPLE)) == {
        "restarted": [{"host": "cattle-ab12.example.net", "n": 1, "ok": True, "none": None}],
        "braces": "{host} { {not} }",
        "lone": "a { b",
        "closing": "c } d",
    }


@given(st.text(), st.text())
def test_every_value_is_json_escaped(host, detail):
    note = Notification(host, "m", "restarted", detail, TIME)
    assert json.loads(BodyTemplate(SLACK).render(note)) == {
        "text": f"{host}: restarted ({detail})"
    }


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ('{"text": "{hostname}"}', r"unknown placeholder\(s\) \{hostname\}; known: \{host\}"),
        ('{"text": "{}"}', r"unknown placeholder\(s\) \{\}"),
        ('{"text": {host}}', r"not valid JSON: .*\(placeholders go inside JSON strings\)"),
        ("{text: 1}", "not valid JSON: Expecting property name"),
        ("slack.json", r"not valid JSON: .*\(a file is given as @PATH\)"),
        ("", "not valid JSON"),
    ],
)
def test_bad_templates_are_refused_at_start(template, error):
    with pytest.raises(ValueError, match=error):
        BodyTemplate.from_option(template)


def test_a_template_from_a_file(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(GOOGLE_CHAT)
    template = BodyTemplate.from_option(f"@{path}")
    assert json.loads(template.render(SAMPLE))["text"].startswith("*restarted* cattle-ab12")


def test_template_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=f"cannot read template file {tmp_path}/none.json"):
        BodyTemplate.from_option(f"@{tmp_path}/none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"text": "{nope}"}')
    with pytest.raises(ValueError, match=f"template file {bad}: unknown placeholder"):
        BodyTemplate.from_option(f"@{bad}")
    huge = tmp_path / "huge.json"
    huge.write_text('"' + "x" * 70_000 + '"')
    with pytest.raises(ValueError, match="is over 65536 bytes"):
        BodyTemplate.from_option(f"@{huge}")


# -- headers --


def test_a_header_takes_its_secret_from_the_environment():
    assert parse_header("Authorization=Bearer ${TOKEN}", {"TOKEN": "abc="}) == (
        "Authorization",
        "Bearer abc=",
    )
    # Split at the first '=': a value may hold more (base64 padding).
    assert parse_header(" X-Key = a=b ", {}) == ("X-Key", "a=b")
    assert parse_header("X-Two=${A}:${B}", {"A": "1", "B": "2"}) == ("X-Two", "1:2")
    assert parse_header("X-Price=5$", {}) == ("X-Price", "5$")


@pytest.mark.parametrize(
    ("text", "environ", "error"),
    [
        ("Authorization=Bearer ${TOKEN}", {}, "environment variable TOKEN is not set"),
        ("Authorization=Bearer ${TOKEN}", {"TOKEN": ""}, "environment variable TOKEN is empty"),
        ("Authorization=Bearer ${TOK-EN}", {}, "is not an environment variable name"),
        ("Authorization=Bearer ${TOKEN", {}, "without a closing"),
        ("Authorization: Bearer s3cret", {}, "expected NAME=VALUE"),
        ("Auth orization=s3cret", {}, r"header name 'Auth'… has a character"),
        ("=s3cret", {}, r"header name ''… has a character"),
        ("X-Empty=", {}, "header X-Empty has an empty value"),
        ("X-Bad=${V}", {"V": "s3cret\r\nX-Injected: 1"}, "other than printable ASCII"),
        ("X-Bad=caf\u00e9-s3cret", {}, "other than printable ASCII"),
        ("Content-Length=5", {}, "set by the HTTP client"),
        ("host=example.net", {}, "set by the HTTP client"),
    ],
)
def test_bad_headers_are_refused_without_showing_their_value(text, environ, error):
    with pytest.raises(ValueError, match=error) as raised:
        parse_header(text, environ)
    assert "s3cret" not in str(raised.value)


def test_several_headers_from_flags_toml_or_one_per_line():
    expected = (("A", "1"), ("B", "2"))
    assert parse_headers(["A=1", "B=2"], {}) == expected
    assert parse_headers("A=1\nB=2\n", {}) == expected
    assert parse_headers("", {}) == ()
    with pytest.raises(ValueError, match="header a is given twice"):
        parse_headers(["A=1", "a=2"], {})
