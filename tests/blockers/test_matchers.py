"""The alerts API a URL names, and --block-alert-filter's label matchers (pure parsing)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mandrill.blockers.matchers import AlertsKind, parse_alerts_url, parse_filter

# --- the URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "kind", "expected"), [
    ("http://prom:9090/api/v1/alerts", AlertsKind.PROMETHEUS, "http://prom:9090/api/v1/alerts"),
    ("https://am.example/api/v2/alerts/", AlertsKind.ALERTMANAGER,
     "https://am.example/api/v2/alerts"),
    ("http://h/prometheus/api/v1/alerts", AlertsKind.PROMETHEUS,
     "http://h/prometheus/api/v1/alerts"),
    ("prometheus+http://prom:9090", AlertsKind.PROMETHEUS, "http://prom:9090/api/v1/alerts"),
    ("prometheus+https://h/prefix/", AlertsKind.PROMETHEUS, "https://h/prefix/api/v1/alerts"),
    ("alertmanager+http://am:9093", AlertsKind.ALERTMANAGER, "http://am:9093/api/v2/alerts"),
    ("alertmanager+http://am:9093/api/v2/alerts", AlertsKind.ALERTMANAGER,
     "http://am:9093/api/v2/alerts"),
    # A query is the user's (Alertmanager's own filter=, say): kept.
    ("http://am/api/v2/alerts?receiver=ops", AlertsKind.ALERTMANAGER,
     "http://am/api/v2/alerts?receiver=ops"),
])
def test_the_url_says_whose_alerts(url, kind, expected):
    api = parse_alerts_url(url)
    assert (api.kind, api.url) == (kind, expected)


@pytest.mark.parametrize(("url", "error"), [
    ("http://prom:9090", "say whose alerts"),
    ("http://prom:9090/api/v1/query", "say whose alerts"),
    ("ftp://prom/api/v1/alerts", "not an http(s) URL"),
    ("prom:9090/api/v1/alerts", "not an http(s) URL"),
    ("grafana+http://g/api/v1/alerts", "not an http(s) URL"),
    ("http:///api/v1/alerts", "not an http(s) URL"),
    ("http://prom/api/v1/alerts#x", "not an http(s) URL"),
])
def test_a_url_that_does_not_say_is_refused_in_one_line(url, error):
    with pytest.raises(ValueError, match=re.escape(error)) as caught:
        parse_alerts_url(url)
    assert "\n" not in str(caught.value)


def test_credentials_are_not_shown():
    api = parse_alerts_url("https://ops:s3cret@prom.example:9443/api/v1/alerts?x=1")
    assert api.url.startswith("https://ops:s3cret@")  # httpx sends them as basic auth
    assert api.shown == "https://prom.example:9443/api/v1/alerts"


# --- the filter ---------------------------------------------------------------------------


def matches(text: str, labels: dict[str, str], host: str = "web-1.example.net") -> bool:
    return parse_filter(text).for_host(host, host.split(".")[0]).matches(labels)


NODE_DOWN = {"alertname": "NodeDown", "severity": "critical", "instance": "web-1:9100"}


@pytest.mark.parametrize(("text", "labels", "expected"), [
    ("", NODE_DOWN, True),
    ("{}", NODE_DOWN, True),
    ('alertname=~"Node.*",severity="critical"', NODE_DOWN, True),
    ('{alertname=~"Node.*", severity="critical"}', NODE_DOWN, True),
    ('alertname=~"Node.*",severity="critical"', {**NODE_DOWN, "severity": "warning"}, False),
    # Anchored, as in Prometheus: "Node" alone does not match "NodeDown".
    ('alertname=~"Node"', NODE_DOWN, False),
    ('alertname!~"Watchdog|InfoInhibitor"', NODE_DOWN, True),
    ('alertname!~"Watchdog|InfoInhibitor"', {"alertname": "Watchdog"}, False),
    ('severity!="info"', NODE_DOWN, True),
    # An absent label is "", as in Prometheus.
    ('team=""', NODE_DOWN, True),
    ('team!=""', NODE_DOWN, False),
    ('team!="db"', NODE_DOWN, True),
    # A plain word needs no quotes; a trailing comma is fine.
    ("severity=critical,", NODE_DOWN, True),
    ("alertname=~Node.*", NODE_DOWN, True),
    # Escapes.
    ('summary="say \\"hi\\""', {"summary": 'say "hi"'}, True),
    # As in PromQL, a regular expression's backslash is written twice inside quotes.
    ('version=~"1\\\\.2\\\\..*"', {"version": "1.2.3"}, True),
    ('version=~"1\\\\.2\\\\..*"', {"version": "1x2.3"}, False),
    # The host about to be restarted, escaped inside a regular expression.
    ('instance=~"{instance_name}(:[0-9]+)?"', NODE_DOWN, True),
    ('instance=~"{instance_name}(:[0-9]+)?"', {"instance": "web-10:9100"}, False),
    ('host="{hostname}"', {"host": "web-1.example.net"}, True),
    ('host=~"{hostname}"', {"host": "web-1Xexample.net"}, False),  # "." is escaped
])
def test_label_matchers(text, labels, expected):
    assert matches(text, labels) is expected


@pytest.mark.parametrize(("text", "error"), [
    ("severity", "cannot read 'severity'"),
    ('severity=="critical"', "cannot read"),
    ('9lives="x"', "cannot read"),
    ('severity="critical" team="db"', "expected ','"),
    ('severity="critical', "cannot read"),
    ('alertname=~"Node(.*"', "not a regular expression"),
    ('alertname="a\\qb"', "unknown escape \\q"),
    ('a="b",,c="d"', "cannot read"),
])
def test_a_bad_filter_is_refused_in_one_line(text, error):
    with pytest.raises(ValueError, match=re.escape(error)) as caught:
        parse_filter(text)
    assert "\n" not in str(caught.value)


label_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@given(st.lists(st.tuples(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True),
                          st.sampled_from(["=", "!="]), label_values), max_size=4))
def test_a_filter_reads_back_from_its_text(matchers):
    text = ",".join(f'{label}{op}"{_quoted(value)}"' for label, op, value in matchers)
    parsed = parse_filter(text)
    assert [(m.label, str(m.op), m.value) for m in parsed.matchers] == matchers
    assert parse_filter(str(parsed)) == parsed


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace(
        "\t", "\\t")
