"""A message id the ledger already holds for another message (a restarted emulator numbers
its messages from 1 again): decided as a new message, saved beside the first, and said
(``Decided.conflict``) — never taken for a redelivery. Every SQL ledger."""

from __future__ import annotations

from mandrill.ledger import SQLLedger
from mandrill.ledger.base import DeadLetterRecord
from mandrill.message import Delivery, parse_delivery
from mandrill.policy import Outcome, Reason, Verdict
from tests.ledger import (
    HOUR,
    PUBLISHED,
    WEEK,
    Clock,
    decide,
    decide_one,
    delivery,
    finish,
    verdict,
)
from tests.ledger import message as message_for


def published_at(message_id: str, instance: str, when: float) -> Delivery:
    return delivery(message_id, instance)._replace(publish_time=when)


async def test_a_reused_id_for_another_host_is_a_new_message(
    ledger: SQLLedger, clock: Clock
) -> None:
    first = await decide_one(ledger, message_for("7", "web-1"))
    await finish(ledger, first, Outcome.RESTARTED)
    assert first.conflict == ""

    clock.now += HOUR
    reused = await decide_one(ledger, message_for("7", "web-2"))
    assert verdict(reused)[0] is Verdict.RESTART
    assert reused.claim is not None
    assert reused.conflict == "web-1.example.net"
    await finish(ledger, reused, Outcome.RESTARTED)

    # Both kept: the history and the saved messages lose neither.
    saved = await ledger.saved_messages()
    assert [(s.message_id, s.hostname) for s in saved] == [
        ("7", "web-1.example.net"), ("7", "web-2.example.net")
    ]
    history = await ledger.history()
    assert [(h.message_id, h.hostname, h.outcome) for h in history] == [
        ("7", "web-2.example.net", "restarted"), ("7", "web-1.example.net", "restarted")
    ]

    # Redeliveries of either are still recognised, and are no conflict.
    for instance in ("web-1", "web-2"):
        again = await decide_one(ledger, message_for("7", instance))
        assert verdict(again) == (Verdict.DUPLICATE, "already restarted")
        assert again.conflict == ""
    counts = await ledger.counts()
    assert (counts["messages_received"], counts["deliveries_received"]) == (2, 4)


async def test_a_reused_id_for_the_same_host_is_told_by_its_publish_time(
    ledger: SQLLedger, clock: Clock
) -> None:
    first = await decide_one(ledger, message_for("7", "web-1"))
    await finish(ledger, first, Outcome.RESTARTED)

    clock.now += HOUR
    later = parse_delivery(published_at("7", "web-1", PUBLISHED + HOUR))
    reused = await decide_one(ledger, later)
    # A new message for a host restarted an hour ago: the interval rule, not a duplicate.
    assert reused.decision is not None
    assert (reused.decision.verdict, reused.decision.reason) == (Verdict.SKIP, Reason.INTERVAL)
    assert reused.conflict == "web-1.example.net"

    clock.now += WEEK
    again = await decide_one(ledger, later)
    assert verdict(again) == (Verdict.DUPLICATE, "already skipped")
    assert again.conflict == ""


async def test_a_reused_id_in_one_transaction_with_a_redelivery(ledger: SQLLedger) -> None:
    await decide(ledger, message_for("7", "web-1"))
    redelivery, reused = await decide(
        ledger, message_for("7", "web-1"), message_for("7", "web-2")
    )
    assert verdict(redelivery)[0] is Verdict.BUSY  # its own claim, still under way
    assert redelivery.conflict == ""
    assert verdict(reused)[0] is Verdict.RESTART
    assert reused.conflict == "web-1.example.net"


async def test_a_dead_letter_with_a_reused_id_keeps_the_saved_message(ledger: SQLLedger) -> None:
    await decide(ledger, message_for("7", "web-1"))
    await ledger.dead_letter(
        [DeadLetterRecord(delivery("7", data=b"not json"), Reason.INVALID, "invalid: not JSON")]
    )
    saved = await ledger.saved_messages()
    assert [(s.message_id, s.hostname, s.status) for s in saved] == [
        ("7", "web-1.example.net", "received"), ("7", None, "dead_letter")
    ]


async def test_two_messages_under_one_new_id_in_one_transaction(ledger: SQLLedger) -> None:
    """Both saved, each once: the first as the id's first message, the second beside it
    (the rows written first as generation 0 are not written twice)."""
    first, second = await decide(ledger, message_for("7", "web-1"), message_for("7", "web-2"))
    assert verdict(first)[0] is Verdict.RESTART
    assert first.conflict == ""
    assert verdict(second)[0] is Verdict.RESTART
    assert second.conflict == "web-1.example.net"
    counts = await ledger.counts()
    assert (counts["messages_received"], counts["deliveries_received"]) == (2, 2)
