"""An outage as its calls see it: two lines in the log, a reason for readiness, a limit."""

from __future__ import annotations

import logging
import math

import pytest

from mandrill.outage import Outage
from tests.support.fakes import FakeTime


def test_an_outage_is_one_line_when_it_begins_and_one_when_it_ends(caplog) -> None:
    fake = FakeTime()
    outage = Outage("Pub/Sub", limit=60, setting="--source-outage-limit", clock=fake.clock)
    outage.succeeded()  # no outage: nothing to say
    assert outage.problem() is None
    with caplog.at_level(logging.DEBUG, logger="mandrill.outage"):
        fake.now = 100.0
        for attempt in range(5):
            outage.failed(f"pull from s: HTTP 503 (attempt {attempt})")
            fake.now += 2
        assert outage.problem() == "pull from s: HTTP 503 (attempt 4) (failing for 10s)"
        assert outage.remaining() == 50
        outage.succeeded()
        outage.succeeded()
    assert [r.getMessage() for r in caplog.records] == [
        "Pub/Sub unavailable: pull from s: HTTP 503 (attempt 0); retrying with backoff until"
        " it answers (for up to 60s, --source-outage-limit)",
        "Pub/Sub recovered after 10.0s (5 failed attempts)",
    ]
    assert outage.problem() is None
    assert outage.remaining() == 60


def test_past_its_limit_an_outage_says_how_long_it_lasted() -> None:
    fake = FakeTime()
    outage = Outage("Pub/Sub", limit=90, setting="--source-outage-limit", clock=fake.clock)
    outage.failed("pull: refused")
    fake.now = 91
    assert outage.remaining() == -1
    assert outage.past_limit() == "Pub/Sub unavailable for 91s (--source-outage-limit 90s)"


def test_without_a_limit_an_outage_is_outlasted_forever() -> None:
    outage = Outage("Pub/Sub", clock=lambda: 0.0)
    outage.failed("pull: refused")
    assert outage.remaining() == math.inf


def test_a_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        Outage("Pub/Sub", limit=0)
